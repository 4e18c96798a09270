"""Thin Prefect layer and the `mlpl` CLI (DESIGN.md, "Layout")."""
