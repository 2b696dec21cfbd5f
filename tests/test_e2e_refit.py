"""The whole deletion with the output refit, with real parts: gRPC on loopback, SQLite, Ed25519 and real
ezkl proofs for Group-OBS *and* the refit of the layer after the masked one.

The provider publishes a refit pair (``fc1`` masked, ``fc2`` refit, ReLU); its Group-OBS and refit
circuits share logrows so the refit proof is checked against the Group-OBS ``theta'``. An honest
client is accepted and its ``fc2`` is the ridge refit; a client that smuggles another ``fc2`` past it
and one that refits from other weights than the proven ones are rejected with specific reasons, as is
the honest answer without its refit proof; the auditor's offline re-check of the exported bundle
agrees.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from torch import nn
from zkunlearn.client.fisher import fit_rows, layer_factors
from zkunlearn.client.refit import committed_rows, refit_following_layer
from zkunlearn.client.unlearning import GroupObsUnlearner, UnlearningError
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.deletion import UPDATE_KIND_GROUP_OBS, DeletionCircuits, RefitSpec, verify_deletion
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.models import CommitmentRef

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_e2e_real import (
    GO_SPEC,
    LAYER,
    OPTIONS,
    Tiny,
    World,
    client_circuit,
    data,
    edge,
    mask_for,
    serve,
)

if TYPE_CHECKING:
    from tests.conftest import SharedCircuits

pytestmark = [pytest.mark.ezkl, pytest.mark.grpc, pytest.mark.slow]
MODEL = "tiny-mlp-refit"
REFIT = RefitSpec(
    masked=LAYER,
    masked_bias=None,
    following="fc2",
    # Four committed rows keep both circuits at logrows 14 (the relation at more rows is
    # tests/test_output_refit_proof.py's); ridge damping makes the refit unique all the same.
    n=4,
    d_in=8,
    hidden=8,
    d_out=3,
    rel_lam=0.05,
    activation="relu",
    # Declared from the model's own statistics (inputs / 4 <= 0.84, |theta| <= 1.4, |h| <= 1.8,
    # |fc2| <= 0.36, outputs <= 0.68): the tolerance is only as tight as these are.
    z_bound=1.0,
    w_bound=2.0,
    v_bound=1.0,
    h_bound=2.5,
    y_bound=1.5,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, shared_circuits: SharedCircuits) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e-refit")
    circuits = shared_circuits.build(group_obs=GO_SPEC, refits=[REFIT])
    (_refit, refit_arts) = circuits.refits[0]
    assert circuits.group_obs is not None
    assert circuits.group_obs[1].logrows == refit_arts.logrows == 14
    assert DeletionCircuits.load(circuits.directory).refits[0][0] == REFIT
    server = serve(tmp, MODEL, circuits.directory)
    yield World(circuits, server, tmp)
    server.stop(0)


def refit_client(  # type: ignore[no-untyped-def]
    world: World,
    name: str,
    cls: type[GroupObsUnlearner] = GroupObsUnlearner,
    reconstruction_weight: float = 0.0,
):
    from zkunlearn.proofs.artifacts import client_artifacts

    if "refit" not in world.device_circuits:  # derived once, as client_circuit does
        _spec, arts = world.circuits.refits[0]
        world.device_circuits["refit"] = client_artifacts(
            arts.compiled.read_bytes(), arts.settings.read_bytes(), arts.srs, world.tmp / "device" / "refit"
        )
        assert world.device_circuits["refit"].vk.read_bytes() == arts.vk.read_bytes()
    refit_circuit = world.device_circuits["refit"]
    model = Tiny()
    unlearner = cls(
        model,
        GO_SPEC,
        client_circuit(world, "group_obs"),
        world.tmp / name / "state",
        OPTIONS,
        refits=[(REFIT, refit_circuit)],
    )
    x, y = data()
    commitments = unlearner.enroll(
        [LAYER], x, y, nn.functional.cross_entropy, reconstruction_weight=reconstruction_weight
    )
    assert {c.name for c in commitments} >= {"z:fc1.weight", "b1:fc1.weight", "v:fc2"}
    client = edge(world, name, unlearner)
    client.enroll(name, MODEL, [LAYER], 1, commitments)
    return client, unlearner, model


class SmugglesFc2(GroupObsUnlearner):
    """Dishonest: proves a following layer moved off the ridge solution (e.g. a fine-tune)."""

    self_check = False

    def _refit_job(self, refit, circuit, arrays, meta, theta_after, after_blind):  # type: ignore[no-untyped-def]
        from zkunlearn.proofs.fixedpoint import felts

        job, v_new, v_blind = super()._refit_job(refit, circuit, arrays, meta, theta_after, after_blind)
        moved = v_new + 0.25
        inputs = [*job.inputs[:-1], felts(np.vstack([moved, v_blind]), self.scale)]
        return type(job)(inputs, job.compiled, job.vk, job.pk, job.srs, job.label), moved, v_blind


class RefitsUnmaskedWeights(GroupObsUnlearner):
    """Dishonest: refits as if Group-OBS had changed nothing (theta' := theta in the refit proof)."""

    self_check = False

    def _refit_job(self, refit, circuit, arrays, meta, theta_after, after_blind):  # type: ignore[no-untyped-def]
        theta = arrays[f"{refit.masked}/theta"]
        return super()._refit_job(refit, circuit, arrays, meta, theta, arrays[f"{refit.masked}/theta_blind"])


def test_honest_refit_accepted_and_dishonest_ones_rejected(world: World) -> None:
    clients = {
        # The honest client's curvature carries the reconstruction term (the code LM's setting): the
        # relation is the same, the committed factor is another one, and the proofs must still hold.
        "honest": refit_client(world, "honest", reconstruction_weight=0.3),
        "smuggles": refit_client(world, "smuggles", SmugglesFc2),
        "unmasked": refit_client(world, "unmasked", RefitsUnmaskedWeights),
    }
    honest_model = clients["honest"][2]
    committed_g = {name: u.committed_factor(LAYER) for name, (_c, u, _m) in clients.items()}
    with pytest.raises(UnlearningError, match=r"no committed factor for layer 'fc2\.weight'"):
        clients["honest"][1].committed_factor("fc2.weight")
    x, y = data()
    for weight, name in ((0.3, "honest"), (0.0, "smuggles")):
        want = layer_factors(Tiny(), [LAYER], x, y, nn.functional.cross_entropy, GO_SPEC.block,
                             curvature="ggn", reconstruction_weight=weight)[LAYER]  # fmt: skip
        fitted = fit_rows(want.factors, GO_SPEC.m).reshape(committed_g[name].shape)
        assert np.abs(committed_g[name] - fitted).max() < 1e-3, name
    assert np.abs(committed_g["honest"] - committed_g["smuggles"]).max() > 0.05
    fc1_before = honest_model.fc1.weight.detach().double().numpy().copy()
    v_before = np.hstack(
        [
            honest_model.fc2.weight.detach().double().numpy(),
            honest_model.fc2.bias.detach().double().numpy()[:, None],
        ]
    )
    mask = mask_for(honest_model)
    requests = {name: world.server.service.create_request(name, mask) for name in clients}
    enrolled = {name: world.server.state.get_client(name) for name in clients}
    outcomes = {name: client.poll()[0] for name, (client, _u, _m) in clients.items()}
    got = {name: (o.status, o.reason) for name, o in outcomes.items()}
    expected = {
        "honest": ("accepted", ""),
        "smuggles": ("rejected", "refit of fc2: refit_not_ridge_solution"),
        "unmasked": ("rejected", "refit of fc2: proof_invalid_for_expected_commitments"),
    }
    assert {n: status for n, (status, _r) in got.items()} == {n: s for n, (s, _r) in expected.items()}, got
    for name, (_status, reason) in expected.items():
        assert reason in got[name][1], got
    # The honest client's fc2 is the ridge refit of its committed rows (4 evenly spaced ones of its 32
    # samples: fc1 reads the raw input), to the grid.
    fc1_after = honest_model.fc1.weight.detach().double().numpy()
    assert not np.allclose(fc1_after, fc1_before)
    fit = refit_following_layer(
        x.double().numpy()[committed_rows(32, REFIT.n)],
        fc1_before,
        np.zeros(8),
        fc1_after,
        v_before[:, :-1],
        v_before[:, -1],
        "relu",
        REFIT.rel_lam,
    )
    assert np.allclose(honest_model.fc2.weight.detach().double().numpy(), fit.weight, atol=2e-3)
    assert np.allclose(honest_model.fc2.bias.detach().double().numpy(), fit.bias, atol=2e-3)
    # A client that proves Group-OBS but skips the refit (as if the provider had not asked for it):
    # the honest submission without its refit proof is refused before any proof is checked.
    honest_request = requests["honest"]
    (submission,) = world.server.state.submissions_for(honest_request.request_id)
    sizes = json.loads(submission.proof_sizes)
    proofs = [submission.proof[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
    honest_record = enrolled["honest"]
    assert honest_record is not None
    before = [CommitmentRef.from_json(c) for c in json.loads(honest_record.current_commitments)]
    skipped = verify_deletion(
        world.circuits,
        update_kind=UPDATE_KIND_GROUP_OBS,
        request_id=honest_request.request_id,
        request_canonical=honest_request.canonical,
        mask_bytes=honest_request.mask,
        forget_features=None,
        forget_labels=None,
        before=before,
        after=[CommitmentRef.from_json(c) for c in json.loads(submission.after_commitments)],
        proofs=proofs[:-1],
    )
    assert not skipped.ok
    assert f"expected {len(proofs)} proofs" in skipped.reason, skipped.reason
    assert clients["honest"][0].verify_log() == 3
    for client, _u, _m in clients.values():
        client.close()
    # The auditor re-judges every submission offline, refit proofs included, from an exported bundle.
    service = world.server.service
    bundle = export_bundle(
        world.server.state,
        service.ledger,
        service.signer.public_bytes(),
        world.tmp / "bundle",
        circuits_dir=world.circuits.directory,
    )
    report = audit_bundle(bundle, provider_public_key=service.signer.public_bytes())
    assert report.ok, [item for item in report.items if not item.ok]
    assert report.tree_size == 3
