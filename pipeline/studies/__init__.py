"""Experiments about the recipe (benchmarks, the capacity, data-size, serving and ablation studies, the GPU check):
they import the recipe's stages and report, and nothing in the recipe imports them."""
