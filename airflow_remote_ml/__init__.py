"""airflow-remote-ml: one operator, any backend, chosen per run."""

from __future__ import annotations

__version__ = "0.1.0"
