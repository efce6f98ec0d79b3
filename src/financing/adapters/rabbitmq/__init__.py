"""RabbitMQ adapter: watermill-compatible topology, envelopes, publishing and consuming."""

from financing.adapters.rabbitmq.consumer import RetryPolicy, run_subscription
from financing.adapters.rabbitmq.dead_letters import (
    DeadLetter,
    DeadLetters,
    list_dead_letters,
    requeue_dead_letters,
)
from financing.adapters.rabbitmq.envelopes import from_amqp, to_amqp
from financing.adapters.rabbitmq.publisher import AmqpCommandSender, Publisher, PublishFailed
from financing.adapters.rabbitmq.topology import (
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    connect,
    declare_command_queue,
    declare_dead_letter_queue,
    declare_event_queue,
    declare_events_exchange,
)

__all__ = [
    "DEAD_LETTER_QUEUE",
    "EVENTS_EXCHANGE",
    "AmqpCommandSender",
    "DeadLetter",
    "DeadLetters",
    "PublishFailed",
    "Publisher",
    "RetryPolicy",
    "connect",
    "declare_command_queue",
    "declare_dead_letter_queue",
    "declare_event_queue",
    "declare_events_exchange",
    "from_amqp",
    "list_dead_letters",
    "requeue_dead_letters",
    "run_subscription",
    "to_amqp",
]
