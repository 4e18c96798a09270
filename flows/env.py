"""Process environment for Prefect, set before Prefect is imported (docs/architecture.md, "Environment facts")."""

from __future__ import annotations

import os

_DEFAULTS = {
    # The first ephemeral flow call on a fresh database can take > 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # Offline machines: no telemetry calls.
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Stage logs (rates, rejects, dev tables) appear in the Prefect UI beside the flow's own.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "mlpl",
    # ...and outside a flow (plain `mlpl train`, tests) those loggers log locally without a warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def configure_prefect_env() -> None:
    """Set Prefect defaults that the user has not set already."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
