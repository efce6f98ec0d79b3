"""A foreign gRPC client of the Commands API: grpcio (grpc.aio) with stubs that protoc
generates from protos/financing.proto into build/bench_grpc, as any client of the
reference would, rather than the service's own grpclib and betterproto code."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "financing.proto"
GENERATED = ROOT / "build" / "bench_grpc"


def _stubs() -> tuple[ModuleType, ModuleType]:
    """financing_pb2 and financing_pb2_grpc, generated afresh from the contract's proto."""
    GENERATED.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"--python_out={GENERATED}",
            f"--grpc_python_out={GENERATED}",
            str(PROTO),
        ],
        check=True,
    )
    if str(GENERATED) not in sys.path:
        sys.path.insert(0, str(GENERATED))
    return importlib.import_module("financing_pb2"), importlib.import_module("financing_pb2_grpc")


class ForeignCommands:
    """SellInvoice and BidOnInvoice over one HTTP/2 channel of grpcio."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._pb, grpc_module = _stubs()
        self._channel = grpc.aio.insecure_channel(f"{address[0]}:{address[1]}")
        self._stub: Any = grpc_module.CommandsStub(self._channel)

    async def sell_invoice(self, issuer_id: str, asking_price: float) -> str:
        """The new invoice's id, once the command is accepted (durably queued)."""
        pb = self._pb
        reply = await self._stub.SellInvoice(
            pb.SellInvoiceCommand(
                issuer_id=pb.UUID(value=issuer_id), asking_price=pb.Money(amount=asking_price)
            ),
            timeout=30,
        )
        invoice_id: str = reply.value
        return invoice_id

    async def bid_on_invoice(self, investor_id: str, invoice_id: str, amount: float) -> None:
        """Returns when the RPC answers OK: the command is accepted."""
        pb = self._pb
        await self._stub.BidOnInvoice(
            pb.BidOnInvoiceCommand(
                investor_id=pb.UUID(value=investor_id),
                invoice_id=pb.UUID(value=invoice_id),
                bid=pb.Money(amount=amount),
            ),
            timeout=30,
        )

    async def close(self) -> None:
        await self._channel.close()
