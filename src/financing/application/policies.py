"""Saga policies: react to one domain event by changing one other aggregate.

Together they are the financing saga: a placed bid finances or is rejected by
the invoice; the investor's reserved funds follow (released, committed).
"""

from __future__ import annotations

from financing.application.errors import MissingAggregate
from financing.application.ports import UnitOfWork
from financing.domain.aggregates import Investor, Invoice
from financing.domain.events import (
    Bid,
    BidOnInvoicePlacedEvent,
    BidOnInvoiceRejectedEvent,
    InvoiceApprovedEvent,
    InvoiceFinancedEvent,
    InvoiceReversedEvent,
)
from financing.domain.money import subtract


async def bid_placed_offers_bid_to_invoice(uow: UnitOfWork, event: BidOnInvoicePlacedEvent) -> None:
    invoice = await uow.load(Invoice, event.invoice_id)
    if not invoice.exists:
        raise MissingAggregate(f"invoice {event.invoice_id} does not exist")
    invoice.bid(Bid(investor_id=event.investor_id, amount=event.bid_amount))
    await uow.save(invoice)


async def rejected_bid_releases_funds(uow: UnitOfWork, event: BidOnInvoiceRejectedEvent) -> None:
    investor = await _investor(uow, event.bid)
    investor.release_funds(event.bid.amount)
    await uow.save(investor)


async def financing_releases_excess_bid(uow: UnitOfWork, event: InvoiceFinancedEvent) -> None:
    investor = await _investor(uow, event.bid)
    investor.release_funds(subtract(event.bid.amount, event.asking_price))
    await uow.save(investor)


async def approval_commits_funds(uow: UnitOfWork, event: InvoiceApprovedEvent) -> None:
    investor = await _investor(uow, event.bid)
    investor.commit_funds(event.sold_price)
    await uow.save(investor)


async def reversal_releases_funds(uow: UnitOfWork, event: InvoiceReversedEvent) -> None:
    investor = await _investor(uow, event.bid)
    investor.release_funds(event.sold_price)
    await uow.save(investor)


async def _investor(uow: UnitOfWork, bid: Bid) -> Investor:
    investor = await uow.load(Investor, bid.investor_id)
    if not investor.exists:
        raise MissingAggregate(f"investor {bid.investor_id} does not exist")
    return investor
