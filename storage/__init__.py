"""The only layer that touches fsspec, pyarrow, webdataset and checkpoint files (DESIGN.md, "Layout")."""
