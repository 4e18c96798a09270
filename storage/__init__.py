"""The only layer that touches fsspec, pyarrow, webdataset and checkpoint files (docs/architecture.md, "Layers")."""
