"""Structured pruning and ASR pathways (Yang et al.): 8×1 block masks at the requested sparsity, iterative pruning
that only removes more, group lasso, pathway steps that leave other languages' weights alone, LTH rewinding."""

from __future__ import annotations

import pytest
import torch

from models.encoder import CTCLIDModel
from models.prune import (
    apply_masks_,
    block_norms,
    current_masks,
    encoder_linears,
    group_lasso,
    imp_schedule,
    latent_weights,
    magnitude_mask,
    pathway_step,
    rewind_,
    set_pathway_,
    sparsity_of,
)


def _model() -> CTCLIDModel:
    torch.manual_seed(0)
    return CTCLIDModel(vocab_size=30, num_languages=2, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, n_mels=20,
                       dropout=0.0)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.706])
def test_masks_have_the_requested_sparsity_in_whole_8x1_blocks_and_drop_the_smallest(sparsity):
    torch.manual_seed(1)
    w = torch.randn(64, 48)
    mask = magnitude_mask(w, sparsity)
    blocks = mask.reshape(8, 8, 48)
    assert (blocks.all(dim=1) | ~blocks.any(dim=1)).all()  # every 8×1 block kept or dropped whole
    assert (~blocks.any(dim=1)).sum().item() == round(sparsity * 8 * 48)
    assert sparsity_of(mask) == pytest.approx(sparsity, abs=1 / 384)
    norms, kept = block_norms(w), blocks.all(dim=1)
    if 0 < sparsity:
        assert norms[~kept].max() <= norms[kept].min()


def test_iterative_pruning_only_removes_more_and_follows_the_20_percent_schedule():
    assert imp_schedule(0.706) == pytest.approx([0.2, 0.36, 0.488, 0.5904, 0.67232, 0.706])
    torch.manual_seed(2)
    w = torch.randn(32, 16)
    first = magnitude_mask(w, 0.2)
    w2 = w + 10 * (~first).float()  # pruned blocks grew: they must stay pruned all the same
    second = magnitude_mask(w2, 0.36, keep=first)
    assert not (second & ~first).any() and sparsity_of(second) == pytest.approx(0.36, abs=1 / 64)


def test_group_lasso_is_the_sum_of_block_norms():
    model = _model()
    expected = sum(block_norms(m.weight).sum() for m in encoder_linears(model).values())
    torch.testing.assert_close(group_lasso(model), expected)


def test_a_pathway_step_leaves_weights_outside_the_batch_languages_mask_unchanged():
    model = _model()
    weights = latent_weights(model)
    masks = {n: torch.stack([magnitude_mask(w, 0.5), magnitude_mask(-w.flip(0), 0.5)]) for n, w in weights.items()}
    apply_masks_(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    feats, lens = torch.randn(2, 60, 20), torch.tensor([60, 45])
    for pathway in (1, 0):  # a language-1 step first: Adam's momentum then pulls on every weight it touched
        set_pathway_(model, pathway)
        before = {n: w.detach().clone() for n, w in latent_weights(model).items()}
        pathway_step(model, opt, model(feats, lens).log_probs.mean())
        for name, w in latent_weights(model).items():
            outside = ~masks[name][pathway]
            assert torch.equal(w[outside], before[name][outside])
            assert not torch.equal(w[~outside], before[name][~outside])
    with torch.no_grad():
        set_pathway_(model, 0)
        zero = model(feats, lens).log_probs
        set_pathway_(model, 1)
        one = model(feats, lens).log_probs
    assert not torch.allclose(zero, one)
    assert all(torch.equal(m, masks[n][1]) for n, m in current_masks(model).items())
    with pytest.raises(ValueError, match="pathway 2"):
        set_pathway_(model, 2)


def test_lottery_ticket_rewinding_restores_the_initial_weights_under_the_mask():
    model = _model()
    initial = {n: w.detach().clone() for n, w in latent_weights(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    feats, lens = torch.randn(2, 60, 20), torch.tensor([60, 45])
    model(feats, lens).log_probs.mean().backward()
    opt.step()
    trained = latent_weights(model)
    masks = {n: magnitude_mask(w, 0.5) for n, w in trained.items()}  # found on the trained weights
    apply_masks_(model, masks)
    rewind_(model, initial)
    for name, m in encoder_linears(model).items():
        assert torch.equal(latent_weights(model)[name], initial[name])
        assert torch.equal(m.weight, initial[name] * masks[name])  # the ticket: initial weights, trained mask
