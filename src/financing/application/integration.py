"""Integration handlers: turn Registering's events into our commands.

The command's message id derives from the integration event's, so a
redelivered event sends the same command again and the command handler
deduplicates it. Sending waits for the broker's confirm; a failure propagates
(never ignored), so the event is not acked and will be retried.
"""

from __future__ import annotations

from financing.application.messages import (
    CreateInvestor,
    CreateIssuer,
    InvestorRegistered,
    IssuerRegistered,
)
from financing.application.ports import Cause, CommandSender, derived_message_id

# The integration event on whose arrival each command is sent: a command of one of these
# names whose message id derives from a message's id (`derived_message_id`) was sent on
# that message's arrival, which is no record of the store's (`trace`).
SENT_ON = {
    CreateIssuer.name(): IssuerRegistered.name(),
    CreateInvestor.name(): InvestorRegistered.name(),
}


async def issuer_registered_creates_issuer(
    sender: CommandSender, event: IssuerRegistered, cause: Cause
) -> None:
    command = CreateIssuer(id=event.id)
    await sender.send(command, derived_message_id(cause.causation_id, command.name()), cause)


async def investor_registered_creates_investor(
    sender: CommandSender, event: InvestorRegistered, cause: Cause
) -> None:
    command = CreateInvestor(id=event.id, balance=event.balance)
    await sender.send(command, derived_message_id(cause.causation_id, command.name()), cause)
