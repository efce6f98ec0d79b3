"""Long-running workers: the relayer (event store to bus) and the projector (bus to read models)."""
