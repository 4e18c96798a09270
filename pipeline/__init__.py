"""The recipe's stages as plain functions over typed configs (DESIGN.md, "Layout"). Never imports Prefect."""
