"""The relations that are proven: pure torch modules exported to ONNX. Imports no other part of zkunlearn."""

__all__: list[str] = []
