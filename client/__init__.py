"""The edge SDK: applies, proves and submits unlearning updates on a device.

Never imports ``zkunlearn.provider``: the SDK ships alone to devices.
"""

__all__: list[str] = []
