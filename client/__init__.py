"""The edge SDK: applies, proves and submits unlearning updates on a device.

Never imports ``zkunlearn.provider``: the SDK ships alone to devices. The one-call device
(:class:`~zkunlearn.client.device.EdgeDevice`) is importable from here; it is loaded on first use, so
``zkunlearn.client.sdk`` alone still needs neither torch nor ezkl.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import AppliedInfo, DeviceError, EdgeDevice, Enrollment, RequestInfo
    from .unlearning import ProveOptions

__all__ = ["AppliedInfo", "DeviceError", "EdgeDevice", "Enrollment", "ProveOptions", "RequestInfo"]
_HOMES = {name: "device" for name in __all__} | {"ProveOptions": "unlearning"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
