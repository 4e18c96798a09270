"""Torch modules only: encoder, heads, loss, CTC decoding (docs/architecture.md, "Layers")."""
