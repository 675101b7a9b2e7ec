"""Backends: one module per place a step can run. Each imports its SDK lazily, on first use."""
