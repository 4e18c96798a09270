"""The recipe's stages as plain functions over typed configs (docs/architecture.md, "Layers"). Never imports Prefect."""
