"""Which update kinds a provider accepts: the sound (exact) relations by default, the loose fixed-point
ones only when the operator opts in (e.g. to benchmark one relation against another).

The fixed-point relations do not certify the deletion (docs/protocol.md, "Update kinds"): kind 2
(``ANALYTIC``) accepts ``W' = W``, a no-op, and kind 1 (``GROUP_OBS``) lets every unmasked weight of
a block move by about 0.7 of the weights' standard deviation. See
docs/decisions/sound-kinds-only.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .errors import FailedPreconditionError
from .models import (
    LOOSE_UPDATE_KINDS,
    UPDATE_KIND_ANALYTIC,
    UPDATE_KIND_ANALYTIC_EXACT,
    UPDATE_KIND_GROUP_OBS,
    UPDATE_KIND_GROUP_OBS_EXACT,
    UPDATE_KINDS,
)

__all__ = [
    "KIND_NAMES",
    "check_accepted_kind",
    "kind_label",
    "kinds_from_names",
    "loose_kind_problem",
    "warn_if_loose",
]

log = logging.getLogger(__name__)

#: Config name (as in ``[policy] update_kinds``) -> update kind.
KIND_NAMES = {name: kind for kind, name in UPDATE_KINDS.items()}

_WIRE_NAMES = {
    UPDATE_KIND_GROUP_OBS: "GROUP_OBS (1)",
    UPDATE_KIND_ANALYTIC: "ANALYTIC (2)",
    UPDATE_KIND_GROUP_OBS_EXACT: "GROUP_OBS_EXACT (3)",
    UPDATE_KIND_ANALYTIC_EXACT: "ANALYTIC_EXACT (4)",
}
_WHY_LOOSE = {
    UPDATE_KIND_GROUP_OBS: (
        "its fixed-point relation lets every unmasked weight of a block move by about 0.7 of the "
        "weights' standard deviation and still verify"
    ),
    UPDATE_KIND_ANALYTIC: (
        "its fixed-point relation accepts W' = W, so a client that does not unlearn at all passes"
    ),
}
_INSTEAD = {
    UPDATE_KIND_GROUP_OBS: UPDATE_KIND_GROUP_OBS_EXACT,
    UPDATE_KIND_ANALYTIC: UPDATE_KIND_ANALYTIC_EXACT,
}


def kind_label(kind: int) -> str:
    """The wire name and number of an update kind, e.g. ``GROUP_OBS_EXACT (3)``."""
    return _WIRE_NAMES.get(kind, f"unknown ({kind})")


def loose_kind_problem(kind: int) -> str:
    """Why a loose kind is refused and what to use instead (for kinds 1 and 2 only)."""
    return (
        f"update kind {kind_label(kind)} does not certify the deletion: {_WHY_LOOSE[kind]} (see "
        f"docs/protocol.md, 'Update kinds'); use {kind_label(_INSTEAD[kind])} instead. An operator "
        f"comparing relations can opt in with [policy] update_kinds = [..., {UPDATE_KINDS[kind]!r}]"
    )


def check_accepted_kind(kind: int, accepted: frozenset[int]) -> None:
    """Refuse an enrollment of ``kind`` unless the provider's policy accepts it (one message naming the
    kind, why it is refused and what to use instead)."""
    if kind in accepted:
        return
    if kind in LOOSE_UPDATE_KINDS:
        raise FailedPreconditionError(f"this provider refuses the enrollment: {loose_kind_problem(kind)}")
    offered = ", ".join(kind_label(k) for k in sorted(accepted)) or "none"
    raise FailedPreconditionError(
        f"this provider does not accept update kind {kind_label(kind)}; it accepts {offered}"
    )


def kinds_from_names(names: Iterable[str]) -> frozenset[int]:
    """``["group_obs_exact", "analytic_exact"]`` -> ``{3, 4}``; an unknown name raises ``ValueError``
    naming it and the valid ones."""
    kinds: set[int] = set()
    for name in names:
        if name not in KIND_NAMES:
            raise ValueError(
                f"config key policy.update_kinds holds {str(name)[:40]!r}, not an update kind; "
                f"valid: {sorted(KIND_NAMES)}"
            )
        kinds.add(KIND_NAMES[name])
    return frozenset(kinds)


def warn_if_loose(accepted: Iterable[int], where: str = "this provider") -> None:
    """Log a warning for each loose kind ``accepted`` opts into."""
    for kind in sorted(set(accepted) & LOOSE_UPDATE_KINDS):
        log.warning("%s accepts a loose update kind on opt-in: %s", where, loose_kind_problem(kind))
