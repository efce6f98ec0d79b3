-- Event store of the command side (see schema.py for how sections are applied).

-- version: 1

-- Every event ever recorded. `position` is handed out at insert time, so it
-- may become visible out of commit order; `transaction_id`, the inserting
-- transaction's id, lets readers wait for transactions still in flight and
-- orders events so that causes come before effects (event_store.py, outbox.py).
CREATE TABLE events (
    position       bigserial   PRIMARY KEY,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    aggregate_type text        NOT NULL,
    aggregate_id   uuid        NOT NULL,
    version        integer     NOT NULL CHECK (version > 0),
    name           text        NOT NULL,
    -- json, not jsonb: keeps the exact text that was encoded, which is what is relayed.
    body           json        NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    -- Optimistic concurrency: two writers appending the same version cannot both commit.
    CONSTRAINT events_stream_version UNIQUE (aggregate_id, version)
);

CREATE INDEX events_commit_order ON events (transaction_id, position);

-- The state of an aggregate after `version` events, so that loading replays
-- only the events after it. Money is stored as strings: exact.
CREATE TABLE snapshots (
    aggregate_id   uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    version        integer     NOT NULL CHECK (version > 0),
    state          jsonb       NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now()
);

-- Messages whose effects are committed, per consumer: recorded in the same
-- transaction as the effects, so a redelivered message changes nothing.
CREATE TABLE processed_messages (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- How far each relayer has published, in (transaction_id, position) order.
CREATE TABLE relay_checkpoints (
    name           text        PRIMARY KEY,
    transaction_id xid8        NOT NULL,
    position       bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- version: 2

-- Consumers are named after their handler, not after the queue that feeds it
-- (queues belong to the broker's topology and may change).
UPDATE processed_messages AS p
SET consumer = renamed.handler
FROM (VALUES
    ('CreateIssuer', 'create_issuer'),
    ('CreateInvestor', 'create_investor'),
    ('SellInvoice', 'sell_invoice'),
    ('BidOnInvoice', 'bid_on_invoice'),
    ('ApproveFinancing', 'approve_financing'),
    ('ReverseFinancing', 'reverse_financing'),
    ('events_BidOnInvoicePlacedEvent', 'bid_placed_offers_bid_to_invoice'),
    ('events_BidOnInvoiceRejectedEvent', 'rejected_bid_releases_funds'),
    ('events_InvoiceFinancedEvent', 'financing_releases_excess_bid'),
    ('events_InvoiceApprovedEvent', 'approval_commits_funds'),
    ('events_InvoiceReversedEvent', 'reversal_releases_funds')
) AS renamed (queue, handler)
WHERE p.consumer = renamed.queue;

-- version: 3

-- Correlation: every event keeps the correlation id of the command whose saga it
-- belongs to, and the id of the message that caused it; every processed message
-- keeps what became of it, so `financing trace` can tell a command's whole story
-- from what committed (a crash loses none of it).
ALTER TABLE events
    ADD COLUMN correlation_id text,
    ADD COLUMN causation_id   text;
CREATE INDEX events_correlation ON events (correlation_id) WHERE correlation_id IS NOT NULL;

ALTER TABLE processed_messages
    ADD COLUMN name           text,
    ADD COLUMN correlation_id text,
    ADD COLUMN outcome        text,
    ADD COLUMN detail         text,
    ADD COLUMN events         integer;
CREATE INDEX processed_messages_correlation ON processed_messages (correlation_id)
    WHERE correlation_id IS NOT NULL;
-- Pruning of deduplication records goes by age.
CREATE INDEX processed_messages_age ON processed_messages (processed_at);

-- version: 4

-- Each processed message keeps its body's digest, so that a different message reusing
-- a processed message id is told from a copy (and dead-lettered, not dropped).
ALTER TABLE processed_messages ADD COLUMN digest text;

-- version: 5

-- The event store's name, made with it and carried with its data (a dump, a standby):
-- the query database records the store whose read models it holds (queries version 5),
-- so that a deployment pointed at another's query database is refused, not mixed in.
-- A store that holds events already is named after its first event, so that a dump of
-- it taken before this version, restored and migrated, gets the same name; an empty
-- one is named at random.
CREATE TABLE event_store_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id        uuid    NOT NULL
);
INSERT INTO event_store_identity (id)
SELECT coalesce(
    (SELECT md5(concat_ws(' ', position, aggregate_id, version, name, body))::uuid
     FROM events ORDER BY position LIMIT 1),
    gen_random_uuid()
);
