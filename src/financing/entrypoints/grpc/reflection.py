"""gRPC server reflection, so generic tools (grpcurl) list, describe and call the services.

The messages and stubs are betterproto's, which register no protobuf
descriptors; reflection needs them. They come from the descriptor set that
`make proto` writes beside the generated code (`generated/financing.binpb`,
shipped in the package), plus the health and reflection protocols' own, under
the names grpc-go's servers give them (`grpc/health/v1/health.proto`, ...).
A file is answered with every file it imports, as grpc-go answers: a client
that asks for the file of `Commands` can build it without asking again.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib import resources
from typing import Any

from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet
from google.protobuf.descriptor_pool import DescriptorPool
from grpclib.health.v1 import health_pb2
from grpclib.reflection import _deprecated as reflection_v1alpha
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.utils import _service_name

DESCRIPTORS = "financing.binpb"

# The protocols' own files, under the names of the gRPC project's protos (grpclib's
# modules register them under names of their own: `grpclib/health/v1/health.proto`).
PROTOCOL_FILES = {
    health_pb2: "grpc/health/v1/health.proto",
    reflection_pb2: "grpc/reflection/v1/reflection.proto",
    reflection_v1alpha_pb2: "grpc/reflection/v1alpha/reflection.proto",
}


def descriptor_pool() -> DescriptorPool:
    """Every file a client may ask about: financing.proto with its imports, health, reflection."""
    pool = DescriptorPool()
    data = resources.files("financing.generated").joinpath(DESCRIPTORS).read_bytes()
    for file in FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    for module, name in PROTOCOL_FILES.items():
        proto = FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        proto.name = name
        pool.Add(proto)
    return pool


def imported(file: FileDescriptor) -> list[FileDescriptor]:
    """Every file `file` imports, directly or not, each once, the nearest first."""
    found: list[FileDescriptor] = []
    waiting = list(file.dependencies)
    while waiting:
        dependency = waiting.pop(0)
        if dependency.name != file.name and dependency not in found:
            found.append(dependency)
            waiting.extend(dependency.dependencies)
    return found


class _WithImports:
    """A reflection service that answers a file with the files it imports after it."""

    def _file_descriptor_response(self, file_descriptor: FileDescriptor) -> Any:
        response = super()._file_descriptor_response(file_descriptor)  # type: ignore[misc]
        for dependency in imported(file_descriptor):
            proto = FileDescriptorProto()
            dependency.CopyToProto(proto)
            response.file_descriptor_response.file_descriptor_proto.append(
                proto.SerializeToString()
            )
        return response


class _Reflection(_WithImports, ServerReflection):
    pass


class _ReflectionV1Alpha(_WithImports, reflection_v1alpha.ServerReflection):
    pass


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


REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


def with_reflection(services: Collection[Any]) -> list[Any]:
    """`services` and the reflection services (v1 and v1alpha) that describe them, and
    list them and themselves (as grpc-go's and grpcio's servers list them: `grpcurl
    list`; grpclib's own listed only the services it was given)."""
    names = [_service_name(service) for service in services]
    names.extend(name for name in REFLECTION_SERVICES if name not in names)
    pool = _MethodsFound(descriptor_pool())
    return [
        *services,
        _Reflection(_service_names=names, _pool=pool),
        _ReflectionV1Alpha(_service_names=names, _pool=pool),
    ]
