"""The provider: gRPC server, deletion masks, verification and the append-only receipt log.

Never imports ``zkunlearn.client``: the provider does not run client code.
"""

__all__: list[str] = []
