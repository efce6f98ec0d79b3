"""Command handlers: each loads one aggregate, decides, and saves its new events.

They may read another aggregate to check that it exists (an invoice needs a
registered issuer; a bid needs an existing invoice), but mutate only one.
"""

from __future__ import annotations

from uuid import UUID

from financing.application.errors import MissingAggregate
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    ReverseFinancing,
    SellInvoice,
)
from financing.application.ports import UnitOfWork
from financing.domain.aggregates import Investor, Invoice, Issuer


async def create_issuer(uow: UnitOfWork, command: CreateIssuer) -> None:
    issuer = await uow.load(Issuer, command.id)
    issuer.create()
    await uow.save(issuer)


async def create_investor(uow: UnitOfWork, command: CreateInvestor) -> None:
    investor = await uow.load(Investor, command.id)
    investor.create(command.balance)
    await uow.save(investor)


async def sell_invoice(uow: UnitOfWork, command: SellInvoice) -> None:
    issuer, invoice = await uow.load_both(Issuer, command.issuer_id, Invoice, command.invoice_id)
    if not issuer.exists:
        raise MissingAggregate(f"issuer {command.issuer_id} is not registered")
    invoice.create(command.issuer_id, command.asking_price)
    await uow.save(invoice)


async def bid_on_invoice(uow: UnitOfWork, command: BidOnInvoice) -> None:
    # Reserving funds for an invoice that does not exist would lock them forever.
    invoice, investor = await uow.load_both(
        Invoice, command.invoice_id, Investor, command.investor_id
    )
    if not invoice.exists:
        raise MissingAggregate(f"invoice {command.invoice_id} does not exist")
    if not investor.exists:
        raise MissingAggregate(f"investor {command.investor_id} does not exist")
    investor.place_bid(command.invoice_id, command.bid_amount)
    await uow.save(investor)


async def approve_financing(uow: UnitOfWork, command: ApproveFinancing) -> None:
    invoice = await _existing_invoice(uow, command.invoice_id)
    invoice.approve()
    await uow.save(invoice)


async def reverse_financing(uow: UnitOfWork, command: ReverseFinancing) -> None:
    invoice = await _existing_invoice(uow, command.invoice_id)
    invoice.reverse()
    await uow.save(invoice)


async def _existing_invoice(uow: UnitOfWork, invoice_id: UUID) -> Invoice:
    invoice = await uow.load(Invoice, invoice_id)
    if not invoice.exists:
        raise MissingAggregate(f"invoice {invoice_id} does not exist")
    return invoice
