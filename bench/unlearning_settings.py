"""The unlearning benchmark's tasks, methods and per-task settings (training budgets, mask recipe,
curvature and damping), with the seeds those settings were tuned on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


TASKS = ("vit", "mlp", "code-lm")


METHODS = (
    "personalized", "mask-only", "head-row-only", "group-obs-certified", "group-obs", "group-obs-refit",
    "support-finetune", "layers-finetune", "mask-finetune", "analytic", "retrain",
)  # fmt: skip


# Methods whose recovery is reported: the configuration the proofs certify (rank m, its damping), the
# unproven full-rank Group-OBS, the same followed by the output refit (provable for ReLU layers), the
# fine-tune of exactly the weights Group-OBS may change (the unmasked weights of
# the blocks the mask touches), the fine-tune of the masked layers' unmasked weights (a wider support:
# blocks the mask leaves alone too), and the unrestricted fine-tune (the utility reference).
RECOVERING = (
    "group-obs-certified", "group-obs", "group-obs-refit", "support-finetune", "layers-finetune",
    "mask-finetune",
)  # fmt: skip


def task_methods(task: str, deletion: str = "class") -> tuple[str, ...]:
    """The methods ``run_job`` reports for ``task``: no refit where the task's setting has none (the MLP's
    masked layer feeds its masked head), no analytic head on the language model, the forget class's head
    row zeroed alone (``head-row-only``, the output-only deletion the forgetting metrics must expose)
    only for a class deletion."""
    skip = {"group-obs-refit"} if SETTINGS[task].refit_lam is None else set()
    if deletion != "class" or task == "code-lm":
        skip.add("head-row-only")
    if SETTINGS[task].certified is None:
        skip.add("group-obs-certified")
    if task == "code-lm":
        skip.add("analytic")
    return tuple(m for m in METHODS if m not in skip)


@dataclass(frozen=True)
class CertifiedSpec:
    """What a Group-OBS proof commits to besides the mask: the rank of each block's curvature factor and
    the damping (``proofs.exact.ExactGroupObsSpec``), and how many blocks one proof covers (``batch``:
    a layer whose block count it does not divide is padded, ``proofs.layout.layer_layout``; the update
    itself does not depend on it)."""

    m: int
    lam: float
    batch: int = 4


@dataclass(frozen=True)
class MaskSpec:
    score: str
    fraction: float
    structure: str = "unstructured"
    # The "block" structure's cap on each touched block (provider.masks.select_blocks); 1 = whole blocks.
    density: float = 1.0
    # Rows of each extra layer (the classifier head, rows = classes) removed whole by neuron score, outside
    # the fraction's budget (provider.masks.compute_mask's class_rows); 0 = the head shares the budget.
    head_rows: int = 0


@dataclass(frozen=True)
class TaskSettings:
    """Training budgets and unlearning hyperparameters of one task (chosen by measurement, see docs)."""

    epochs: int
    lr: float
    personal_epochs: int
    personal_lr: float
    finetune_epochs: int
    block_size: int
    lam: float
    mask: MaskSpec
    batch_size: int = 128
    fisher_samples: int = 1024
    mask_samples: int = 512
    quick_epochs: int = 2
    # Masked besides the model's own targets: the image classifiers' head, whose forget-class row is
    # what lets any mask remove the class (fc1-only masks do not; see the mask sweep).
    extra_layers: tuple[str, ...] = ()
    # The client's curvature (client/fisher.py): "ggn" for classifiers, "empirical" where the exact GGN
    # is out of reach (the LM's 64 positions x 260 classes per window).
    curvature: str = "empirical"
    # Weight of the masked layers' reconstruction curvature added to it (client/fisher.py: I (x) E[x x^T],
    # an activation-space trust region); 0 = the loss curvature alone.
    reconstruction_weight: float = 0.0
    # Pixels by which copies of the client's images are moved (four directions) and added to the inputs
    # of its label-free curvature (client.fisher.shifted_copies); 0 = the images alone.
    fisher_shift: int = 0
    # Epochs of the support-restricted fine-tune (enough for it to level off; see the docs' table).
    support_epochs: int = 20
    # Relative ridge of the output refit after Group-OBS (client/refit.py); None where the layer after
    # the masked one is itself masked (the MLP's fc2 feeds the masked head), so no refit applies.
    refit_lam: float | None = None
    # Rows of the masked layer's inputs the refit fits: the ``n`` the protocol commits at enrollment
    # (``client.refit.committed_rows``), so the figure is the one a proof can back; None fits every row.
    refit_rows: int | None = None
    # The configuration the exact Group-OBS proofs certify (factor rank m, damping): the
    # ``group-obs-certified`` method evaluates exactly that update (client.unlearning_exact
    # .certified_weights); None where no certified configuration has been measured for the task.
    certified: CertifiedSpec | None = None
    # ``--quick`` (a smoke run of the whole pipeline, not a measurement): at most this many client
    # samples in the curvature, whose per-sample GGN rows are most of a quick run's time.
    quick_fisher_samples: int = 256

    def fisher_draws(self, quick: bool) -> int:
        """Client samples the curvature is computed on (``client_fisher_data``'s ``n_samples``)."""
        return min(self.fisher_samples, self.quick_fisher_samples) if quick else self.fisher_samples


# Seeds the hyperparameters in SETTINGS were chosen on; every other seed is held out. The per-seed table
# marks them, so a reader can compare held-out recoveries with the tuned ones.
# The ViT's mask, curvature and damping were chosen on seeds 0-2, but its ``fisher_shift`` was chosen
# looking at seeds 0-11, so only the pre-registered 12-23 are held out from every choice.
TUNING_SEEDS: dict[str, tuple[int, ...]] = {"vit": tuple(range(12)), "code-lm": (0,), "mlp": ()}


SETTINGS: dict[str, TaskSettings] = {
    "vit": TaskSettings(
        epochs=40,
        lr=2e-3,
        personal_epochs=40,
        personal_lr=1e-3,
        finetune_epochs=5,
        block_size=64,
        # Gauss-Newton curvature, lam on its plateau (1e-4..1e-3 within 1 point on the tuning seeds; the
        # largest, best conditioned): 89.8 % mean recovery vs 83.1 % for the empirical Fisher at the
        # earlier lam 0.02 and 87.9 % at its best lam (bench/results/unlearning_fisher_tuning.md).
        lam=0.001,
        curvature="ggn",
        # 40 % of the fc1 weights packed into blocks masked at most to 5/8 (a whole block leaves Group-OBS
        # nothing to compensate with), and the head's forget-class row removed whole outside the budget.
        # Chosen on the tuning seeds 0-2 (bench/results/unlearning_structures.md; criterion: a mask that
        # forgets, then the least personal accuracy lost after Group-OBS, then the fewest touched blocks):
        # 0.20 points lost against 0.70 for the earlier unstructured 40 % (global top over fc1 + head),
        # touching 64 % of the blocks instead of 90 %. 0.40 itself was set for the unstructured mask, so
        # that it costs >= 5 points on every tuning seed (recovery is undefined below).
        mask=MaskSpec("fisher-ratio", 0.40, "block", density=0.625, head_rows=1),
        extra_layers=("head.weight",),
        # The GGN also on the client's images moved by one pixel in four directions (label-free, so no
        # labels are invented). NOT chosen on the tuning seeds alone: a scratch run on seeds 0-11 (the
        # 10 whose mask costs >= 5) compared 1-pixel shifts, +-10 degree rotations and Gaussian noise
        # (sigma 0.1) against none: 91.4 / 90.7 / 84.7 / 89.2 % recovery (shift: +2.1 points paired,
        # spread 10.5 -> 7.2). Seeds 12-17 are pre-registered here, before they are trained or run, to
        # confirm it on seeds that played no part in the choice. They gave 86.9 % on the 4 whose mask
        # costs >= 5 (54.5 / 93.0 / 102.4 / 97.9; the shift raised personal accuracy on 5 of the 6),
        # too few to settle it, so seeds 18-23 are pre-registered too, before they are trained or run.
        # Outcome on 12-23 (8 seeds with cost >= 5): 86.7 %; paired with and without the copies, personal
        # accuracy +0.22 +- 0.58 points (8 up, 3 down): kept because that mean is positive (a rule
        # decided before seeds 18-23 ran, not written down in advance).
        fisher_shift=1,
        # Chosen on the tuning seeds 0-2 from 0.003 / 0.01 / 0.03 / 0.1 (99.4 / 99.1 / 100.3 / 99.5 %
        # recovery; a scratch grid, docs/benchmarks.md): the result is flat over that range.
        refit_lam=0.03,
        # 256 committed rows (of ~9,000 tokens): the largest power of two whose GELU refit of one fc2
        # stays within one circuit's 2**26 rows (~55 M, docs/benchmarks.md).
        refit_rows=256,
        # docs/decisions/vit-certified-configuration.md: rank 16 at lam 0.1 recovers 78.1 % on the
        # held-out seeds against 62.3 % at lam 0.001 (bench/results/vit_certified*.json).
        certified=CertifiedSpec(m=16, lam=0.1),
    ),
    "mlp": TaskSettings(
        epochs=30,
        lr=1e-3,
        personal_epochs=10,
        personal_lr=3e-4,
        finetune_epochs=5,
        block_size=128,
        lam=0.02,
        mask=MaskSpec("fisher-ratio", 0.32),
        extra_layers=("head.weight",),
        curvature="ggn",
    ),
    "code-lm": TaskSettings(
        epochs=4,
        lr=3e-3,
        personal_epochs=4,
        personal_lr=1e-3,
        finetune_epochs=2,
        block_size=256,
        # Sampled-label Fisher (81.7 % recovery on the tuning seed vs 79.6 / 78.8 for the empirical Fisher
        # at lam 0.03 / 0.1 on earlier models, bench/results/unlearning_fisher_lm_tuning.md) plus 0.3 x the
        # reconstruction curvature, at the largest lam within 1 point of the best on the tuning seed
        # (bench/results/unlearning_reconstruction_lm_tuning.md). The LM's first fc1 carries most of the
        # mask's cost, and a fine-tune of its own unmasked weights recovers all of it (diagnosis), so
        # there the curvature, not the block-local relation, is what Group-OBS lacked.
        lam=0.003,
        curvature="fisher",
        reconstruction_weight=0.3,
        mask=MaskSpec("fisher-ratio", 0.32),
        batch_size=64,
        # Every client window (1,500): m = 1,500 >= 4B recovered 0.79 vs 0.78 at m = 1,024 (tuning seed 0).
        fisher_samples=1500,
        mask_samples=256,
        # Tuning seed 0 from 0.01 / 0.03 / 0.1: 97.6 / 96.9 / 96.9 % recovery (scratch grid, docs).
        refit_lam=0.01,
        # As the ViT: 256 committed rows (of ~96,000 token rows), within one circuit's reach.
        refit_rows=256,
    ),
}
