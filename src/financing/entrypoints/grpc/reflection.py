"""gRPC server reflection, so generic tools (grpcurl) list, describe and call the services.

The messages and stubs are betterproto's, which register no protobuf
descriptors; reflection needs them. They come from the descriptor set that
`make proto` writes beside the generated code (`generated/financing.binpb`,
shipped in the package), plus the health and reflection protocols' own.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib import resources
from typing import Any

from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet
from google.protobuf.descriptor_pool import DescriptorPool
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2

DESCRIPTORS = "financing.binpb"


def descriptor_pool() -> DescriptorPool:
    """Every file a client may ask about: financing.proto with its imports, health, reflection."""
    pool = DescriptorPool()
    data = resources.files("financing.generated").joinpath(DESCRIPTORS).read_bytes()
    for file in FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    for module in (health_pb2, reflection_pb2, reflection_v1alpha_pb2):
        proto = FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    return pool


class _MethodsFound:
    """`pool`, which also finds the file of a method's full name (`Commands.SellInvoice`),
    as grpcurl's `describe` asks and grpc-go's reflection answers; protobuf's own pool
    finds only messages, fields, enums and services."""

    def __init__(self, pool: DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            found = self._pool.FindServiceByName(service) if service else None
            if found is None or method not in found.methods_by_name:
                raise
            return found.file


# Listed beside the port's services, as grpc-go's and grpcio's servers list them
# (`grpcurl list`); grpclib's listed only the services it was given.
REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


def with_reflection(services: Collection[Any]) -> list[Any]:
    """`services` and the reflection services (v1 and v1alpha) that describe them, and
    list them and themselves."""
    extended: list[Any] = ServerReflection.extend(services, pool=_MethodsFound(descriptor_pool()))
    for reflection in extended[len(services) :]:
        # grpclib keeps the names it lists in this attribute, a list both share.
        names: list[str] = reflection._service_names
        names.extend(name for name in REFLECTION_SERVICES if name not in names)
    return extended
