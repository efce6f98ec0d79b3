"""Long-running workers: the relayer (event store to bus), the projector (bus to read models)
and retention (pruning old deduplication records)."""
