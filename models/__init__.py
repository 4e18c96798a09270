"""Torch modules only: encoder, heads, loss, CTC decoding (DESIGN.md, "Layout")."""
