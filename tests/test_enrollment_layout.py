"""What an enrollment may commit, given the circuits a model publishes (the real wiring through Enroll
with ezkl circuits is in test_e2e_real)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.proofs.published import enrollment_layout_problem
from zkunlearn.proofs.specs import GroupObsSpec, RefitSpec

PUBLISHED = object()  # the check reads which circuits exist, their specs' batch sizes and the refit specs
GO_SPEC = GroupObsSpec(block=16, m=8, batch=1, lam=0.1)  # 16 weights per batch
REFIT = RefitSpec(
    masked="fc1",
    masked_bias=None,
    following="fc2",
    n=16,
    d_in=8,
    hidden=8,
    d_out=3,
    rel_lam=0.05,
    activation="relu",
)


@dataclass(frozen=True)
class C:
    name: str
    block: int
    point_hex: str = "00" * 32


def circuits(**published: object) -> DeletionCircuits:
    fields = {"group_obs": None, "analytic": None, "exact": None, "analytic_exact": None, **published}
    return DeletionCircuits(directory=Path("."), **fields)  # type: ignore[arg-type]


def group_obs(batches: int = 2, layer: str = "fc1") -> list[C]:
    return [C(f"{t}:{layer}", b) for b in range(batches) for t in ("theta", "g")]


REFIT_TENSORS = [C("z:fc1", 0), C("b1:fc1", 0), C("v:fc2", 0)]
GO = circuits(group_obs=(GO_SPEC, PUBLISHED))
AN, AN_EXACT = circuits(analytic=PUBLISHED), circuits(analytic_exact=PUBLISHED)
RW, MW = [C("r:head", 0), C("w:head", 0)], [C("m:head", 0), C("w:head", 0)]
GO_REFIT = circuits(group_obs=(GO_SPEC, PUBLISHED), refits=((REFIT, PUBLISHED),))

CASES: list[tuple[str, DeletionCircuits, int, list[str], list[C], str | None]] = [
    ("honest group-obs", GO, 1, ["fc1"], group_obs(), None),
    ("honest two layers", GO, 1, ["fc1", "fc2"], group_obs() + group_obs(1, "fc2"), None),
    ("honest with refit", GO_REFIT, 1, ["fc1"], group_obs() + REFIT_TENSORS, None),
    ("refit published, not enrolled", GO_REFIT, 1, ["fc1"], group_obs(), "output refit of fc2"),
    ("refit not published", GO, 1, ["fc1"], group_obs() + REFIT_TENSORS, "no published circuit reads"),
    ("refit off batch 0", GO_REFIT, 1, ["fc1"], [*group_obs(), *REFIT_TENSORS, C("v:fc2", 1)], "reads"),
    ("a g batch missing", GO, 1, ["fc1"], group_obs()[:-1], "0..n-1"),
    ("batches not from 0", GO, 1, ["fc1"], [C("theta:fc1", 1), C("g:fc1", 1)], "0..n-1"),
    ("an enrolled layer without tensors", GO, 1, ["fc1", "fc2"], group_obs(), "fc2"),
    ("stray layer", GO, 1, ["fc1"], [*group_obs(), C("theta:fc9", 0)], "no published circuit reads"),
    ("duplicate", GO, 1, ["fc1"], [*group_obs(), C("theta:fc1", 0)], "duplicate"),
    ("kind not published", GO, 2, ["head"], RW, "no circuit for update kind 2"),
    ("unknown kind", GO, 9, ["fc1"], group_obs(), "no circuit for update kind 9"),
    ("honest analytic", AN, 2, ["head"], RW, None),
    ("analytic, exact names", AN, 2, ["head"], MW, "exactly"),
    ("analytic, other layer", AN, 2, ["fc1"], RW, "exactly"),
    ("honest exact analytic", AN_EXACT, 4, ["head"], MW, None),
    ("exact analytic, extra", AN_EXACT, 4, ["head"], [*MW, C("r:head", 0)], "exactly"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "published", "kind", "layers", "commitments", "problem"), CASES, ids=[c[0] for c in CASES]
)
def test_enrollment_layout(
    case: str,
    published: DeletionCircuits,
    kind: int,
    layers: list[str],
    commitments: list[C],
    problem: str | None,
) -> None:
    found = enrollment_layout_problem(published, kind, layers, commitments)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


SHAPES = {
    "fc1": (4, 8),
    "fc2": (3, 4),
    "fc3": (6, 8),
}  # 32 weights = 2 blocks of 16; 12: no whole block; 3 blocks
EXACT = circuits(
    exact=(ExactGroupObsSpec.from_lam(16, 8, 2, 2.0**-10), PUBLISHED, PUBLISHED)
)  # 2 blocks per batch
GO2 = circuits(group_obs=(GroupObsSpec(block=16, m=8, batch=2, lam=0.1), PUBLISHED))


@pytest.mark.parametrize(
    ("published", "kind", "layers", "commitments", "problem"),
    [
        (GO, 1, ["fc1"], group_obs(2), None),
        (GO, 1, ["fc1"], group_obs(1), "need 2 batches"),  # 0..n-1, but the layer only in part
        (GO, 1, ["fc1"], group_obs(3), "need 2 batches"),
        (GO, 1, ["fc9"], group_obs(2, "fc9"), "no layer 'fc9'"),
        (GO, 1, ["fc2"], group_obs(1, "fc2"), "not a multiple of the block size 16"),
        (EXACT, 3, ["fc1"], group_obs(1), None),
        (EXACT, 3, ["fc1"], group_obs(2), "need 1 batches"),
        # 3 blocks, 2 per batch: the exact relation pads the second batch with one zero block ...
        (EXACT, 3, ["fc3"], group_obs(2, "fc3"), None),
        (EXACT, 3, ["fc3"], group_obs(1, "fc3"), "need 2 batches"),
        (EXACT, 3, ["fc3"], group_obs(3, "fc3"), "need 2 batches"),
        (EXACT, 3, ["fc2"], group_obs(1, "fc2"), "not a multiple of the block size 16"),
        # ... the fixed-point relation does not.
        (GO2, 1, ["fc3"], group_obs(2, "fc3"), "only the exact relation pads"),
    ],
)
def test_with_the_model_s_shapes_every_batch_of_a_layer_is_enrolled(
    published: DeletionCircuits, kind: int, layers: list[str], commitments: list[C], problem: str | None
) -> None:
    found = enrollment_layout_problem(published, kind, layers, commitments, SHAPES)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found
        # Structurally sound: only the model's shapes catch it.
        assert enrollment_layout_problem(published, kind, layers, commitments) is None
