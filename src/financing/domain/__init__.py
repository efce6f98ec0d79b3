"""The financing domain: exact money, events and the three aggregates. Pure: no I/O."""
