"""Thin Prefect layer and the `mlpl` CLI (docs/architecture.md, "Layers").

Prefect reads its settings when first imported, so the package sets its offline defaults before any
flow module imports Prefect.
"""

from flows.env import configure_prefect_env

configure_prefect_env()
