"""Structured pruning and language-specific pathways (Yang et al., "Learning ASR pathways"): masks over 8×1 blocks
of the encoder's linear weights, found by magnitude (one round or iterative, IMP), a group-lasso penalty that
drives whole blocks to zero while pruning, lottery-ticket rewinding, and per-language masks ("pathways") of which
the batch's language selects one. Model math only: no I/O, no training loop.

A block is 8 consecutive output rows of one input column of a weight (out, in): the 8×1 blocks of the paper,
which sparse kernels can skip as a unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.quant import encoder_linears, pack_codes, stored_weight, unpack_codes

BLOCK_ROWS = 8


def _check_rows(w: Tensor, rows: int) -> None:
    if w.shape[0] % rows:
        raise ValueError(f"a weight with {w.shape[0]} output rows cannot be cut into {rows}×1 blocks")


def block_norms(w: Tensor, rows: int = BLOCK_ROWS) -> Tensor:
    """(out / rows, in): the L2 norm of each rows×1 block."""
    _check_rows(w, rows)
    return w.detach().float().reshape(w.shape[0] // rows, rows, w.shape[1]).norm(dim=1)


def expand_blocks(block_mask: Tensor, rows: int = BLOCK_ROWS) -> Tensor:
    """A (out / rows, in) block mask as the (out, in) weight mask."""
    return block_mask.repeat_interleave(rows, dim=0)


def magnitude_mask(w: Tensor, sparsity: float, keep: Tensor | None = None, rows: int = BLOCK_ROWS) -> Tensor:
    """The (out, in) bool mask that keeps the largest-norm blocks and zeroes round(sparsity × blocks) of them; with
    `keep` (an earlier mask), blocks it pruned stay pruned (iterative pruning only removes more)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    norms = block_norms(w, rows)
    if keep is not None:
        norms = norms.masked_fill(~keep[::rows], -1.0)  # already pruned: first in line again
    n_pruned = round(sparsity * norms.numel())
    mask = torch.ones(norms.numel(), dtype=torch.bool, device=w.device)
    mask[norms.flatten().argsort()[:n_pruned]] = False
    return expand_blocks(mask.reshape(norms.shape), rows)


def imp_schedule(target: float, rate: float = 0.2) -> list[float]:
    """Iterative magnitude pruning's sparsity after each round: `rate` of the remaining weights per round, the last
    round landing on `target` (0.2 per round reaches 70.6 % in 6 rounds: 1 − 0.8⁶ = 0.738, capped)."""
    if not 0.0 < rate < 1.0 or not 0.0 <= target < 1.0:
        raise ValueError(f"rate={rate} and target={target} must be in (0, 1) and [0, 1)")
    levels, density = [], 1.0
    while not levels or levels[-1] < target:
        density *= 1 - rate
        levels.append(min(target, round(1 - density, 6)))
    return levels


def group_lasso(model: nn.Module, rows: int = BLOCK_ROWS) -> Tensor:
    """Σ over the prunable weights' rows×1 blocks of their L2 norms: the penalty that zeroes whole blocks."""
    terms = []
    for w in latent_weights(model).values():
        _check_rows(w, rows)
        terms.append(w.reshape(w.shape[0] // rows, rows, w.shape[1]).norm(dim=1).sum())
    return torch.stack(terms).sum()


UNION = -1  # the pathway index of every pathway's weights together: what identifies an unknown language


class PathwayMask(nn.Module):
    """A parametrization: the weight times one of its masks — (P, out, in) bool, one per pathway (language), or
    one shared mask (P = 1). `active` picks the pathway the next forward computes with (`UNION`: any pathway's)."""

    def __init__(self, masks: Tensor):
        super().__init__()
        self.register_buffer("masks", masks.bool())
        self.active = 0

    def mask(self) -> Tensor:
        """The active (out, in) mask."""
        return self.masks.any(dim=0) if self.active == UNION else self.masks[self.active]

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask().to(w.dtype)


def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Mask each prunable weight in place: `masks[name]` is (out, in) (one mask) or (P, out, in) (a pathway each)."""
    for name, m in encoder_linears(model).items():
        mask = masks[name]
        mask = mask[None] if mask.dim() == 2 else mask
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        parametrize.register_parametrization(m, "weight", PathwayMask(mask))


def pathway_masks(model: nn.Module) -> dict[str, PathwayMask]:
    """Each masked encoder linear layer's `PathwayMask` (empty for a dense model)."""
    out = {}
    for name, m in encoder_linears(model).items():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, PathwayMask):
                    out[name] = p
    return out


def num_pathways(model: nn.Module) -> int:
    """How many masks each prunable weight has (0: not pruned, 1: one language-agnostic mask)."""
    masks = pathway_masks(model)
    return next(iter(masks.values())).masks.shape[0] if masks else 0


def set_pathway_(model: nn.Module, pathway: int) -> None:
    """Compute with pathway `pathway` (a language's index, or `UNION`) from the next forward on."""
    for p in pathway_masks(model).values():
        if not (pathway == UNION or 0 <= pathway < p.masks.shape[0]):
            raise ValueError(f"pathway {pathway} is not one of the {p.masks.shape[0]} masks")
        p.active = pathway


def current_masks(model: nn.Module) -> dict[str, Tensor]:
    """The active pathway's (out, in) mask of each masked weight."""
    return {name: p.mask() for name, p in pathway_masks(model).items()}


def all_masks(model: nn.Module) -> dict[str, Tensor]:
    """Every pathway's masks of each masked weight, (P, out, in) bool: what `apply_masks_` takes back."""
    return {name: p.masks.clone() for name, p in pathway_masks(model).items()}


def latent_weights(model: nn.Module) -> dict[str, Tensor]:
    """The stored (unmasked) weight of each prunable layer: what an optimizer updates."""
    return {name: stored_weight(m) for name, m in encoder_linears(model).items()}


@contextmanager
def outside_pathway_kept(model: nn.Module) -> Iterator[None]:
    """Put every weight outside the active pathway's mask back as it was when the block ends: an update inside it
    then changes only the active language's weights, whatever AdamW's momentum or weight decay would do."""
    masks, weights = current_masks(model), latent_weights(model)
    kept = {name: w.detach().clone() for name, w in weights.items() if name in masks}
    yield
    with torch.no_grad():
        for name, w in kept.items():
            weights[name].copy_(torch.where(masks[name], weights[name], w))


def pathway_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """One update of the active pathway: backward, step, and every weight outside its mask put back as it was, so
    that momentum or weight decay from other languages' batches cannot move another pathway's weights."""
    with outside_pathway_kept(model):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def sparsity_of(mask: Tensor) -> float:
    """The share of zeros in a mask."""
    return 1.0 - mask.float().mean().item()


def rewind_(model: nn.Module, initial: dict[str, Tensor]) -> None:
    """Lottery-ticket rewinding: each prunable layer's stored weight back to `initial[name]` (its weight at
    initialization, from `latent_weights` then), its masks kept."""
    with torch.no_grad():
        for name, w in latent_weights(model).items():
            w.copy_(initial[name])


def pack_pruned(model: nn.Module, rows: int = BLOCK_ROWS) -> dict[str, Tensor]:
    """The model's state as tensors to save for serving: each masked weight as the float32 weights of the blocks any
    pathway keeps, plus every pathway's block mask at one bit per block; everything else as it is."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, p in pathway_masks(model).items():
        w = stored_weight(encoder_linears(model)[name]).detach().float()
        block_masks = p.masks[:, ::rows]  # (P, out / rows, in)
        kept = block_masks.any(dim=0)  # (out / rows, in)
        blocks = w.reshape(w.shape[0] // rows, rows, w.shape[1]).transpose(1, 2)  # (out / rows, in, rows)
        state[f"{name}.weight.kept"] = blocks[kept].clone()  # (n kept, rows)
        state[f"{name}.weight.masks"] = pack_codes(block_masks.to(torch.uint8), 1)
        state[f"{name}.weight.shape"] = torch.tensor([*block_masks.shape, rows])
    return state | {"pruned.rows": torch.tensor(rows)}


def unpack_pruned_(model: nn.Module, packed: dict[str, Tensor]) -> None:
    """Load `pack_pruned`'s tensors into a model built with as many pathways: the same masks and masked weights (the
    weights no pathway keeps are zero, which no forward reads)."""
    rows = int(packed["pruned.rows"])
    state = {k: v for k, v in packed.items() if not k.startswith("pruned.") and ".weight." not in k}
    for name in pathway_masks(model):
        n_paths, n_rows, n_in, _ = packed[f"{name}.weight.shape"].tolist()
        block_masks = unpack_codes(packed[f"{name}.weight.masks"], 1, (n_paths, n_rows, n_in)).bool()
        blocks = torch.zeros(n_rows, n_in, rows)
        blocks[block_masks.any(dim=0)] = packed[f"{name}.weight.kept"]
        state[f"{name}.parametrizations.weight.original"] = blocks.transpose(1, 2).reshape(n_rows * rows, n_in)
        state[f"{name}.parametrizations.weight.0.masks"] = block_masks.repeat_interleave(rows, dim=1)
    model.load_state_dict(state)
