"""Turn an operator's "forget this" into what each client is asked to do: a mask, or forget samples.

A :class:`DeletionPlanner` is what the provider knows about one model: its global weights, its own
training data (sample ids are row indices of it), a retain proxy, and for analytic clients the
feature map their heads read. ``[planners.<model_id>]`` in ``provider.toml`` names a factory
(``factory = "package.module:callable"``; the table's other keys are its keyword arguments) that
returns one; :class:`TorchPlanner` is the implementation for torch classifiers.
"""

from __future__ import annotations

import abc
import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.nn import functional
from zkunlearn.circuits.mask import LayerMask, Mask

from zkunlearn.errors import MalformedError

from .masks import SCORES, STRUCTURES, LossFn, MaskSelectionError, compute_mask, weight_scores
from .proof_budget import BudgetError, select_within_budget

__all__ = [
    "PLANNED_STRUCTURES",
    "DeletionPlan",
    "DeletionPlanner",
    "ForgetSelection",
    "MaskOptions",
    "PlanError",
    "ProofBudget",
    "TorchPlanner",
    "load_planner",
]

F64 = npt.NDArray[np.float64]
PLANNED_STRUCTURES: tuple[str, ...] = (*STRUCTURES, "budget")
MAX_FORGET_SAMPLES = 100_000


class PlanError(MalformedError):
    """The selection or the options cannot be planned for this model; the message says why."""


@dataclass(frozen=True)
class MaskOptions:
    """An operator's mask choices; an empty field (``""`` or 0) takes the planner's default."""

    score: str = ""
    fraction_ppm: int = 0
    structure: str = ""

    def signed_fields(self) -> dict[str, Any]:
        return {"score": self.score, "fraction_ppm": self.fraction_ppm, "structure": self.structure}


@dataclass(frozen=True)
class ForgetSelection:
    """Exactly one of: a class of the provider's data, row ids of it, or explicit samples."""

    forget_class: int | None = None
    sample_ids: tuple[int, ...] | None = None
    features: F64 | None = None
    labels: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        given = [self.forget_class is not None, self.sample_ids is not None, self.features is not None]
        if sum(given) != 1:
            raise PlanError("name exactly one of: a forget class, sample ids, or forget samples")
        if (self.features is None) != (self.labels is None):
            raise PlanError("forget samples need features and labels together")


@dataclass(frozen=True)
class DeletionPlan:
    """The mask for Group-OBS clients and the forget samples' head features for analytic ones
    (each ``None`` when the order's clients do not need it)."""

    mask: Mask | None
    samples: int
    head_features: F64 | None
    head_labels: F64 | None


@dataclass(frozen=True)
class ProofBudget:
    """The ``"budget"`` structure: the hidden-layer mask concentrated into ``max_batches`` proofs of
    ``batch`` blocks (``density`` of each block at most), and ``head_layer``'s highest-scoring row's
    worth of blocks removed whole (a classifier's class row: nothing to compensate inside it)."""

    block_size: int
    batch: int
    max_batches: int
    density: float
    head_layer: str


class DeletionPlanner(abc.ABC):
    """What a provider must implement per model so operators can issue deletions by class or sample.

    :meth:`plan` is called once per operator order; it must be deterministic for one selection and
    set of options, refuse what does not fit the model with :class:`PlanError` naming the problem
    (whatever ``want_mask`` and ``want_head`` say), and never mutate the model. It computes the mask
    only when ``want_mask`` and the head features only when ``want_head``: the order's clients say
    which they need, and each costs passes over the model.
    """

    def layer_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """The model's parameter shapes by name, which Enroll counts a layer's batches against
        (empty: unknown, only the structural checks apply)."""
        return {}

    @abc.abstractmethod
    def plan(
        self,
        selection: ForgetSelection,
        options: MaskOptions,
        *,
        want_mask: bool = True,
        want_head: bool = True,
    ) -> DeletionPlan: ...


class TorchPlanner(DeletionPlanner):
    """A torch classifier, its training set ``(x, y)`` and its defaults.

    The retain proxy is the first ``retain_size`` training rows the selection does not name (for
    explicit samples, the first rows). ``class_rows`` (layer -> rows) removes that many output rows of
    a classifier head whole when a class is deleted. ``head_features`` maps inputs to an analytic
    head's features; without it, analytic clients cannot be sent requests for this model.
    ``density`` caps each block of the ``"block"`` structure (:func:`.masks.compute_mask`).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        layers: Sequence[str],
        *,
        defaults: MaskOptions,
        block_size: int,
        class_rows: Mapping[str, int] | None = None,
        budget: ProofBudget | None = None,
        retain_size: int = 960,
        head_features: Callable[[Tensor], F64] | None = None,
        loss_fn: LossFn = functional.cross_entropy,
        density: float = 1.0,
    ) -> None:
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise PlanError(f"training data: {x.shape[0]} inputs and {y.shape[0]} labels (need equal, > 0)")
        if not defaults.score or not defaults.fraction_ppm or not defaults.structure:
            raise PlanError("the planner's defaults must set score, fraction_ppm and structure")
        self.model, self.x, self.y = model.eval(), x, y.long()
        self.layers, self.defaults, self.block_size = tuple(layers), defaults, block_size
        self.class_rows, self.budget, self.retain_size = dict(class_rows or {}), budget, retain_size
        self.head_features, self.loss_fn, self.density = head_features, loss_fn, density
        self.n_classes = int(self.y.max()) + 1
        self._lock = threading.Lock()  # scoring hooks the model's modules: one plan at a time

    def layer_shapes(self) -> Mapping[str, tuple[int, ...]]:
        return {name: tuple(int(d) for d in p.shape) for name, p in self.model.named_parameters()}

    # -- the forget set ---------------------------------------------------------------------------

    def _forget_and_retain(self, selection: ForgetSelection) -> tuple[Tensor, Tensor, Tensor]:
        """Forget inputs, their labels, and the retain rows' boolean index over the training data."""
        n = self.x.shape[0]
        keep = torch.ones(n, dtype=torch.bool)
        if selection.forget_class is not None:
            if not 0 <= selection.forget_class < self.n_classes:
                raise PlanError(
                    f"class {selection.forget_class} is not one of the model's 0..{self.n_classes - 1}"
                )
            chosen = self.y == selection.forget_class
            keep &= ~chosen
            return self.x[chosen], self.y[chosen], keep
        if selection.sample_ids is not None:
            ids = list(selection.sample_ids)
            if not ids:
                raise PlanError("no sample ids given")
            if len(set(ids)) != len(ids):
                raise PlanError("sample ids repeat")
            if bad := [i for i in ids if not 0 <= i < n]:
                raise PlanError(f"sample ids out of range 0..{n - 1}: {bad[:5]}")
            index = torch.tensor(ids, dtype=torch.long)
            keep[index] = False
            return self.x[index], self.y[index], keep
        features, labels = selection.features, selection.labels
        if features is None or labels is None:  # excluded by ForgetSelection
            raise PlanError("no forget samples given")
        if tuple(features.shape[1:]) != tuple(self.x.shape[1:]):
            raise PlanError(
                f"forget samples have input shape {list(features.shape[1:])}, "
                f"the model takes {list(self.x.shape[1:])}"
            )
        if labels.shape != (features.shape[0],) or features.shape[0] == 0:
            raise PlanError(
                f"forget labels have shape {list(labels.shape)}, need [{features.shape[0]}] (> 0)"
            )
        if not np.isfinite(features).all():
            raise PlanError("forget samples contain NaN or infinity")
        if labels.min() < 0 or labels.max() >= self.n_classes:
            raise PlanError(f"forget labels must be classes 0..{self.n_classes - 1}")
        x = torch.as_tensor(features, dtype=self.x.dtype)
        return x, torch.as_tensor(labels, dtype=torch.long), keep

    # -- the plan ---------------------------------------------------------------------------------

    def plan(
        self,
        selection: ForgetSelection,
        options: MaskOptions,
        *,
        want_mask: bool = True,
        want_head: bool = True,
    ) -> DeletionPlan:
        with self._lock:
            return self._plan(selection, options, want_mask, want_head)

    def _plan(
        self, selection: ForgetSelection, options: MaskOptions, want_mask: bool, want_head: bool
    ) -> DeletionPlan:
        forget_x, forget_y, keep = self._forget_and_retain(selection)
        if forget_x.shape[0] > MAX_FORGET_SAMPLES:
            raise PlanError(f"{forget_x.shape[0]} forget samples exceed the limit of {MAX_FORGET_SAMPLES}")
        retain_index = torch.nonzero(keep).flatten()[: self.retain_size]
        if retain_index.numel() == 0:
            raise PlanError("the selection leaves no training data to serve as the retain proxy")
        retain = (self.x[retain_index], self.y[retain_index])
        score = options.score or self.defaults.score
        structure = options.structure or self.defaults.structure
        fraction = (options.fraction_ppm or self.defaults.fraction_ppm) / 1e6
        if score not in SCORES:
            raise PlanError(f"unknown mask score {score!r} (choose from {SCORES})")
        if structure not in PLANNED_STRUCTURES:
            raise PlanError(f"unknown mask structure {structure!r} (choose from {PLANNED_STRUCTURES})")
        if not 0.0 < fraction < 1.0:
            raise PlanError(f"mask fraction must be in (0, 1), got {fraction}")
        forget = (forget_x, forget_y)
        mask = self._mask(selection, forget, retain, score, fraction, structure) if want_mask else None
        head_features = head_labels = None
        if want_head and self.head_features is not None:
            head_features = np.asarray(self.head_features(forget_x), dtype=np.float64)
            head_labels = forget_y.numpy().astype(np.float64)
        return DeletionPlan(mask, int(forget_x.shape[0]), head_features, head_labels)

    def _mask(
        self,
        selection: ForgetSelection,
        forget: tuple[Tensor, Tensor],
        retain: tuple[Tensor, Tensor],
        score: str,
        fraction: float,
        structure: str,
    ) -> Mask:
        try:
            if structure == "budget":
                return self._budget_mask(forget, retain, score)
            rows = self.class_rows if selection.forget_class is not None else None
            density = self.density if structure == "block" else 1.0
            return compute_mask(
                self.model, self.layers, forget, retain, self.loss_fn, score, fraction,
                self.block_size, structure, density=density, class_rows=rows,
            )  # fmt: skip
        except (MaskSelectionError, BudgetError) as exc:
            raise PlanError(f"mask selection: {exc}") from exc

    def _budget_mask(self, forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor], score: str) -> Mask:
        budget = self.budget
        if budget is None:
            raise PlanError("this model has no proof budget configured: choose another mask structure")
        scores = weight_scores(self.model, list(self.layers), forget, retain, self.loss_fn, score)
        hidden = select_within_budget(
            {layer: scores[layer] for layer in self.layers if layer != budget.head_layer},
            block_size=budget.block_size,
            batch=budget.batch,
            max_batches=budget.max_batches,
            density=budget.density,
        )
        head_scores = np.asarray(scores[budget.head_layer])
        row_blocks = max(1, head_scores.shape[1] // budget.block_size)
        per_block = head_scores.reshape(-1, budget.block_size).sum(axis=1)
        ranked = np.argsort(-per_block, kind="stable")[:row_blocks]
        head = LayerMask(
            budget.head_layer,
            tuple(head_scores.shape),
            budget.block_size,
            {int(b): tuple(range(budget.block_size)) for b in sorted(ranked)},
        )
        return Mask((*hidden.layers, head))


def load_planner(model_id: str, table: Mapping[str, Any]) -> DeletionPlanner:
    """Build ``[planners.<model_id>]``: import ``factory`` and call it with the table's other keys."""
    spec = table.get("factory")
    if not isinstance(spec, str) or ":" not in spec:
        raise PlanError(f'planners.{model_id}.factory must be "package.module:callable", got {spec!r}')
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PlanError(f"planners.{model_id}.factory {spec!r} cannot be imported: {exc}") from exc
    kwargs = {k: v for k, v in table.items() if k != "factory"}
    try:
        planner = factory(**kwargs)
    except TypeError as exc:
        raise PlanError(f"planners.{model_id}: {spec} refused its arguments {sorted(kwargs)}: {exc}") from exc
    if not isinstance(planner, DeletionPlanner):
        raise PlanError(
            f"planners.{model_id}: {spec} returned {type(planner).__name__}, not a DeletionPlanner"
        )
    return planner
