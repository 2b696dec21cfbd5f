"""The wire protocol, importable as ``zkunlearn.protos`` (generated code lives in ``zkunlearn.v1``).

The generated modules keep the proto package's name so that protoc's own imports resolve; this
module is the stable place SDK and server code import them from.
"""

from zkunlearn.v1 import provider_pb2, provider_pb2_grpc

__all__ = ["provider_pb2", "provider_pb2_grpc"]
