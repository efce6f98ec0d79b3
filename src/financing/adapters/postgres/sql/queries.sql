-- Read models of the query database (schema "read_models").
--
-- The tables are created by a function taking the schema name, so that
-- `financing projections rebuild` builds identical tables in a fresh schema
-- before swapping it in. Every statement is idempotent.

-- version: 1

CREATE OR REPLACE FUNCTION public.financing_create_read_models(target text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', target);

    -- `created` orders every list by the time its row was first projected.
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %I.investors (
            id        uuid    PRIMARY KEY,
            balance   numeric NOT NULL DEFAULT 0,
            reserved  numeric NOT NULL DEFAULT 0,
            committed numeric NOT NULL DEFAULT 0,
            created   bigint  GENERATED ALWAYS AS IDENTITY UNIQUE
        )$ddl$, target);

    -- issuer_id stays NULL while only later events of an invoice were seen
    -- (events out of order from a foreign publisher); such rows are not listed.
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %I.invoices (
            id                    uuid    PRIMARY KEY,
            issuer_id             uuid,
            asking_price          numeric NOT NULL,
            status                text    NOT NULL
                CHECK (status IN ('AVAILABLE', 'FINANCED', 'APPROVED', 'REVERSED')),
            winning_investor_id   uuid,
            winning_amount        numeric,
            created               bigint  GENERATED ALWAYS AS IDENTITY UNIQUE,
            CHECK ((winning_investor_id IS NULL) = (winning_amount IS NULL))
        )$ddl$, target);

    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %I.issuers (
            id      uuid   PRIMARY KEY,
            created bigint GENERATED ALWAYS AS IDENTITY UNIQUE
        )$ddl$, target);

    -- Message ids already projected: recorded in the transaction that
    -- projects them, so a redelivered event changes nothing.
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %I.processed_messages (
            message_id text PRIMARY KEY
        )$ddl$, target);
END
$fn$;

SELECT public.financing_create_read_models('read_models');

-- version: 2

-- Deduplication records are pruned by age (financing.workers.retention), so
-- each keeps when it was recorded. The version 1 tables are created as before
-- and then given that column: the live schema now, a rebuilt one when built.
ALTER FUNCTION public.financing_create_read_models(text) RENAME TO financing_create_read_models_1;

CREATE FUNCTION public.financing_create_read_models(target text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM public.financing_create_read_models_1(target);
    EXECUTE format(
        'ALTER TABLE %I.processed_messages'
        ' ADD COLUMN IF NOT EXISTS processed_at timestamptz NOT NULL DEFAULT now()', target);
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS processed_messages_age'
        ' ON %I.processed_messages (processed_at)', target);
END
$fn$;

SELECT public.financing_create_read_models('read_models');

-- version: 3

-- The events of another relayer (a reference relayer's event, whose message id
-- is its publisher's) are in no event store of this service: the projector keeps
-- each in `foreign_events` as it projects it, in that order, with a digest of
-- what it said (its name, aggregate and body), so that `financing projections
-- rebuild` and `financing check` replay them after the event store's, and a
-- different event reusing one's message id is dead-lettered, not dropped unseen
-- as a copy. Outside the read models' schema, which a rebuild replaces, and never
-- pruned: it is what the read models hold of them.
CREATE TABLE IF NOT EXISTS foreign_events (
    position     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   text        NOT NULL UNIQUE,
    name         text        NOT NULL,
    aggregate_id uuid        NOT NULL,
    body         text        NOT NULL,
    digest       text        NOT NULL,
    projected_at timestamptz NOT NULL DEFAULT now()
);

-- version: 4

-- When the event store recorded each event of this service's store that the
-- projector projected (the relayer's `recorded_at`), kept with its record: a
-- copy says the same time, while a different event that a store which lost
-- events (restored from an older backup, failed over to a standby that was
-- behind) gave the same message id says another. No clock is compared. NULL for
-- another relayer's events (their digests tell) and in the records of earlier
-- releases. Tables made by the function of version 2 and still without the
-- column (the live schema, then a rebuild's under way, in the order a rebuild's
-- swap locks them) are given it here; waiting 5 s at most for each lock, so
-- that start-up tries again rather than queue behind a long holder.
--
-- Release 0.4.0 shipped another version 3, which had already renamed version 2's
-- function to financing_create_read_models_2 and wrapped it (adding a
-- `processed_messages.digest` column, which nothing reads since 0.4.1): on such a
-- database that wrapper is kept as financing_create_read_models_3 and wrapped in
-- turn, so that its tables keep the column every release before expects.
SET LOCAL lock_timeout = '5s';

DO $do$
BEGIN
    IF to_regprocedure('public.financing_create_read_models_2(text)') IS NULL THEN
        ALTER FUNCTION public.financing_create_read_models(text)
            RENAME TO financing_create_read_models_2;
    ELSE
        ALTER FUNCTION public.financing_create_read_models(text)
            RENAME TO financing_create_read_models_3;
    END IF;
END
$do$;

CREATE FUNCTION public.financing_create_read_models(target text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    IF to_regprocedure('public.financing_create_read_models_3(text)') IS NULL THEN
        PERFORM public.financing_create_read_models_2(target);
    ELSE
        PERFORM public.financing_create_read_models_3(target);
    END IF;
    EXECUTE format(
        'ALTER TABLE %I.processed_messages ADD COLUMN IF NOT EXISTS recorded_at timestamptz',
        target);
END
$fn$;

DO $do$
DECLARE
    made record;
BEGIN
    FOR made IN
        SELECT table_schema FROM information_schema.tables
        WHERE table_name = 'processed_messages' AND table_type = 'BASE TABLE'
          AND (table_schema = 'read_models'
               OR starts_with(table_schema, 'read_models_rebuild_'))
        ORDER BY table_schema <> 'read_models', table_schema
    LOOP
        -- IF EXISTS: a rebuild may have swapped or dropped its schema meanwhile.
        EXECUTE format(
            'ALTER TABLE IF EXISTS %I.processed_messages'
            ' ADD COLUMN IF NOT EXISTS recorded_at timestamptz',
            made.table_schema);
    END LOOP;
END
$do$;

-- version: 5

-- The event store whose read models these are (commands version 5), recorded by the
-- first process that opens both databases, and by every rebuild: one row at most.
-- Outside the read models' schema, which a rebuild replaces.
CREATE TABLE IF NOT EXISTS projected_event_store (
    singleton boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    id        uuid        NOT NULL,
    since     timestamptz NOT NULL DEFAULT now()
);
