"""Use cases: command handlers, saga policies, integration handlers, and their ports."""
