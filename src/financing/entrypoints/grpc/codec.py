"""The protobuf codec of both gRPC servers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

if TYPE_CHECKING:
    from grpclib._typing import IProtoMessage


class RequestCodec(ProtoCodec):
    """Protobuf as grpclib decodes it, but a request that cannot be decoded is
    malformed input (INVALID_ARGUMENT), not an internal error (UNKNOWN)."""

    def decode(self, data: bytes, message_type: type[IProtoMessage]) -> IProtoMessage:
        try:
            return super().decode(data, message_type)
        except Exception as exc:  # the parser raises anything on bytes it cannot read
            # The parser does not say which field it could not read; what it says, it says
            # of the caller's own bytes.
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"the request is not a valid {message_type.__name__}:"
                f" {type(exc).__name__}: {str(exc)[:200]}",
            ) from None
