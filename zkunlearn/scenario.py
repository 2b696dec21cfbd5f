"""The demo's world, shared by the provider's and the clients' processes so that all agree on it.

Everything is derived from ``(quick, seed)``: the data split, the global model (trained once and
cached by content), each client's personalization, the circuit shapes, and the analytic clients'
feature map. Two processes that build the same scenario get bit-identical models from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from zkunlearn.circuits.mask import Mask
from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec
from zkunlearn.proofs.deletion import GroupObsSpec
from zkunlearn.proofs.exact import ExactGroupObsSpec
from zkunlearn.tasks.data import ImageTask, Split, make_image_task
from zkunlearn.tasks.forgetting import loss_attack_auc, probe_accuracy
from zkunlearn.tasks.models import MLP, MLPConfig, ViT, ViTConfig
from zkunlearn.tasks.train import predict, train_cached

if TYPE_CHECKING:
    from zkunlearn.provider.planning import MaskOptions, TorchPlanner

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Scenario:
    """``quick``: a small MLP and tiny circuits (CI); otherwise the ViT headline task."""

    quick: bool = False
    seed: int = 0

    @property
    def model_id(self) -> str:
        return "mlp-quick" if self.quick else "vit-mnist"

    @cached_property
    def task(self) -> ImageTask:
        return make_image_task(self.seed, "disjoint")

    def _make(self) -> nn.Module:
        return MLP(MLPConfig(hidden=32)) if self.quick else ViT(ViTConfig())

    @property
    def _spec(self) -> dict[str, object]:
        config = MLPConfig(hidden=32).as_dict() if self.quick else ViTConfig().as_dict()
        return {"scenario": "demo", "model": config, "task_seed": self.seed, "data": "mnist5k-disjoint"}

    def global_model(self) -> nn.Module:
        task = self.task
        x, y = task.provider_train.x, task.provider_train.y
        return train_cached(
            self._make, self._spec, x, y, epochs=12 if self.quick else 40, lr=2e-3, seed=self.seed
        )

    def personalized(self, client_seed: int) -> nn.Module:
        task, base = self.task, self.global_model()
        data = task.client_train
        spec = {**self._spec, "personalized_from": "global", "client_seed": client_seed}
        return train_cached(
            self._make,
            spec,
            data.x,
            data.y,
            epochs=10 if self.quick else 40,
            lr=1e-3,
            seed=client_seed,
            start_from=base,
        )

    # -- circuits ----------------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        """Enrolled layers: the hidden layers Group-OBS compensates in, and the classifier head.

        Measured on this ViT (bench/results/unlearning.md): masks confined to the MLP ``fc1`` layers do
        not remove the class; the class's head row is where the forget-specific weights concentrate.
        The demo enrolls only the last block's ``fc1`` (16k weights): an exact enrollment costs one
        enrollment proof and two KZG commitments per batch of every enrolled layer, so the benchmark
        (``zkunlearn bench vit-deletion``), not the demo, covers all four ``fc1`` layers.
        """
        hidden = ("fc2.weight",) if self.quick else ("blocks.3.fc1.weight",)
        return (*hidden, self.head_layer)

    @property
    def hidden_layers(self) -> tuple[str, ...]:
        return tuple(layer for layer in self.layers if layer != self.head_layer)

    head_layer: str = "head.weight"

    @property
    def exact_spec(self) -> ExactGroupObsSpec:
        """The exact Group-OBS relation the demo's clients prove (update kind 3).

        Full: the ViT's certified configuration (rank 16, damping 0.1; docs/decisions/
        vit-certified-configuration.md) at 2 blocks of 64 per proof: the demo's clients prove at once, and
        an enrollment proof of 2 blocks peaks near 270 MB per worker against about 930 MB at 8
        (``bench/results/exact_batches.json``). Quick: blocks of 16 at rank 8, 4 blocks per proof (the
        MLP's ``fc2`` has 64 blocks and its head 20, so no batch is padded).
        """
        if self.quick:
            return ExactGroupObsSpec.from_lam(16, 8, 4, 0.1)
        return ExactGroupObsSpec.from_lam(64, 16, 2, 0.1)

    @property
    def mask_recipe(self) -> tuple[MaskOptions, float, dict[str, int]]:
        """The benchmark's mask for this task: ``(options, density, class_rows)``.

        Quick: the MLP benchmark's mask (fisher-ratio, 32 % of the enrolled weights, unstructured).
        Full: the ViT benchmark's (fisher-ratio, 40 % in blocks at most 5/8 masked, the head's
        forget-class row removed whole), over the one ``fc1`` layer the demo enrolls.
        """
        from zkunlearn.provider.planning import MaskOptions

        if self.quick:
            return MaskOptions("fisher-ratio", 320_000, "unstructured"), 1.0, {}
        return MaskOptions("fisher-ratio", 400_000, "block"), 0.625, {self.head_layer: 1}

    @property
    def group_obs_spec(self) -> GroupObsSpec:
        """The fixed-point relation's spec (update kind 1), which ``bench proofs`` measures beside the
        exact one; the demo proves the exact relation (:attr:`exact_spec`)."""
        if self.quick:
            return GroupObsSpec(block=16, m=8, batch=1, lam=0.1)
        # The ViT's curvature on shifted images puts up to ~8 in a block's mixed factor rows (the layer's
        # mean diagonal is 1; its most curved blocks carry more): a bound of 8 left no margin.
        return GroupObsSpec(block=64, m=16, batch=1, lam=0.1, g_bound=16.0)

    @property
    def analytic_spec(self) -> ExactAnalyticSpec:
        """The analytic head's published spec (the exact relation; logrows 14 at this shape)."""
        return ExactAnalyticSpec(d=8, k=10, n_u=8)

    @property
    def max_batches(self) -> int:
        """The fixed-point relation's proof budget in ``bench proofs`` (proofs per deletion)."""
        return 2 if self.quick else 6

    mask_density: float = 0.5
    # Pixels of the shifted image copies added to the client's curvature inputs at enrollment: the ViT
    # benchmark's setting (bench/unlearning_settings.py). The quick MLP demo uses it too (not measured on
    # the MLP; it is there so that CI enrolls through that path with real proofs).
    fisher_shift: int = 1

    def planner(self, *, budget: bool = False) -> TorchPlanner:
        """The provider's side: score the global model on the forget set against a retain proxy
        (fisher-ratio) and select the benchmark's mask (:attr:`mask_recipe`) in blocks of the exact
        relation. ``budget``: instead concentrate the hidden-layer mask into the fixed-point relation's
        proof budget and zero the highest-scoring head row's blocks (``bench proofs``' old-circuit
        figures). Analytic heads read :meth:`features`."""
        from zkunlearn.provider.planning import MaskOptions, ProofBudget, TorchPlanner

        train = self.task.provider_train
        if budget:
            spec = self.group_obs_spec
            return TorchPlanner(
                self.global_model(),
                train.x,
                train.y,
                self.layers,
                defaults=MaskOptions("fisher-ratio", 300_000, "budget"),
                block_size=spec.block,
                budget=ProofBudget(
                    spec.block, spec.batch, self.max_batches, self.mask_density, self.head_layer
                ),
                head_features=self.features,
            )
        options, density, class_rows = self.mask_recipe
        return TorchPlanner(
            self.global_model(),
            train.x,
            train.y,
            self.layers,
            defaults=options,
            block_size=self.exact_spec.block,
            class_rows=class_rows,
            density=density,
            head_features=self.features,
        )

    def deletion_mask(self, *, budget: bool = False) -> Mask:
        """The mask :meth:`planner` selects for the forget class."""
        from zkunlearn.provider.planning import ForgetSelection, MaskOptions

        selection = ForgetSelection(forget_class=self.task.forget_class)
        mask = self.planner(budget=budget).plan(selection, MaskOptions(), want_head=False).mask
        assert mask is not None  # want_mask
        return mask

    # -- metrics -----------------------------------------------------------------------------------

    def accuracy(self, model: nn.Module, split: Split) -> float:
        if len(split) == 0:
            return float("nan")
        return float((predict(model, split.x).argmax(1) == split.y).float().mean())

    def client_metrics(self, model: nn.Module) -> dict[str, float | None]:
        """Forgetting on held-out forget-class images of the provider's domain (the deleted data's
        distribution: a disjoint client never saw the class in its own rotated domain); personalization
        on the client's domain; retain on the provider's other classes. Below the outputs
        (:mod:`zkunlearn.tasks.forgetting`): ``probe_acc``, a linear probe on the model's features of
        the provider's held-out images, scored on the forget class; ``mia_auc``, the loss attack's AUC
        of the forget class's training images (the deleted data) against its held-out ones."""
        task = self.task
        forget = task.forget_class
        members = task.provider_train.of_class(forget)
        nonmembers = task.provider_test.of_class(forget)
        return {
            "forget_acc": self.accuracy(model, nonmembers),
            "personal_acc": self.accuracy(model, task.client_test.without_class(forget)),
            "retain_acc": self.accuracy(model, task.provider_test.without_class(forget)),
            "probe_acc": probe_accuracy(model, (task.provider_test.x, task.provider_test.y), forget),
            "mia_auc": loss_attack_auc(model, (members.x, members.y), (nonmembers.x, nonmembers.y)),
        }

    # -- analytic clients --------------------------------------------------------------------------

    def _raw_features(self, x: torch.Tensor) -> F64:
        backbone = self.global_model()
        with torch.no_grad():
            raw: F64 = backbone.features(x).double().numpy()  # type: ignore[operator]
        return raw

    @cached_property
    def _feature_map(self) -> tuple[F64, float]:
        """A seeded projection to ``d`` and one fixed scale, so learn- and forget-time features agree."""
        spec = self.analytic_spec
        reference = self._raw_features(self.task.provider_train.x[:512])
        rng = np.random.default_rng(1000 + self.seed)
        projection: F64 = rng.normal(size=(reference.shape[1], spec.d)) / np.sqrt(reference.shape[1])
        spread = float(np.quantile(np.abs(reference @ projection), 0.99))
        return projection, (spec.x_bound / 4.0) / max(spread, 1e-12)

    def features(self, x: torch.Tensor) -> F64:
        """Frozen global backbone -> fixed projection -> scaled and clipped inside the circuit's bound.

        The projection is part of the published scenario (seeded), as ACU's random expansion is; the
        provider computes the forget samples' features with the same map.
        """
        projection, scale = self._feature_map
        bound = self.analytic_spec.x_bound / 2.0
        out: F64 = np.clip(self._raw_features(x) @ projection * scale, -bound, bound)
        return out

    def analytic_learned(self) -> Split:
        """The client's own samples an analytic client learns: its first ``n_u`` of each class it holds.

        As many per class as the forget class's contributed samples (:meth:`contributed_sample_ids`),
        so that the head learns the forget class as well as the others before the deletion; on the
        client's whole data ``n_u`` samples of a class are outvoted and the class is never predicted.
        """
        train = self.task.client_train
        n_u = self.analytic_spec.n_u
        per_class = [torch.nonzero(train.y == c).flatten()[:n_u] for c in sorted(set(train.y.tolist()))]
        index = torch.cat(per_class).sort().values
        return Split(train.x[index], train.y[index])

    def contributed_sample_ids(self) -> list[int]:
        """Row ids in the provider's training data of the samples an analytic client learned (the
        forget class's first ``n_u``), which a deletion then names."""
        train = self.task.provider_train
        rows = torch.nonzero(train.y == self.task.forget_class).flatten()[: self.analytic_spec.n_u]
        return [int(i) for i in rows]

    def contributed_forget_samples(self) -> Split:
        """The samples :meth:`contributed_sample_ids` names."""
        index = torch.tensor(self.contributed_sample_ids(), dtype=torch.long)
        return Split(self.task.provider_train.x[index], self.task.provider_train.y[index])


def demo_planner(quick: bool = False, seed: int = 0) -> TorchPlanner:
    """``[planners.<model_id>] factory = "zkunlearn.scenario:demo_planner"`` for the demo's provider."""
    return Scenario(quick=quick, seed=seed).planner()
