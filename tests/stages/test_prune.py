"""Structured pruning and ASR pathways (Yang et al.): 8×1 block masks at the requested sparsity, iterative pruning
that only removes more, group lasso, pathway steps that leave other languages' weights alone, LTH rewinding."""

from __future__ import annotations

import pytest
import torch

from models.encoder import CTCLIDModel
from models.prune import (
    UNION,
    apply_masks_,
    block_norms,
    current_masks,
    encoder_linears,
    group_lasso,
    imp_schedule,
    latent_weights,
    magnitude_mask,
    pack_pruned,
    pathway_masks,
    pathway_step,
    rewind_,
    set_pathway_,
    sparsity_of,
    unpack_pruned_,
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
        pathway_step(model, opt, model(feats, lens, torch.tensor([pathway] * 2)).log_probs.mean())
        for name, w in latent_weights(model).items():
            outside = ~masks[name][pathway]
            assert torch.equal(w[outside], before[name][outside])
            assert not torch.equal(w[~outside], before[name][~outside])
    with torch.no_grad():
        set_pathway_(model, 0)
        zero = model(feats, lens, torch.tensor([0, 0])).log_probs
        set_pathway_(model, 1)
        one = model(feats, lens, torch.tensor([1, 1])).log_probs
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


def _pathway_model(n_paths: int = 3) -> CTCLIDModel:
    """A model with `n_paths` random 50 % block masks (one per language)."""
    torch.manual_seed(0)
    model = CTCLIDModel(vocab_size=30, num_languages=3, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, n_mels=20,
                        dropout=0.0, pathways=n_paths)
    apply_masks_(model, {name: torch.stack([magnitude_mask(torch.randn(*w.shape), 0.5) for _ in range(n_paths)])
                         for name, w in latent_weights(model).items()})
    return model.eval()


def test_each_utterance_computes_with_its_languages_pathway_and_an_unknown_one_with_the_lid_heads_pick():
    model = _pathway_model()
    torch.manual_seed(2)
    feats, lens = torch.randn(4, 90, 20), torch.tensor([90, 70, 50, 80])
    with torch.no_grad():
        out = model(feats, lens, torch.tensor([0, 2, -1, 2]))
        for row, path in ((0, 0), (1, 2), (3, 2)):
            set_pathway_(model, path)
            alone = model._forward(feats[row: row + 1, : lens[row]], lens[row: row + 1])
            n = int(alone.out_lens[0])
            torch.testing.assert_close(out.log_probs[row, :n], alone.log_probs[0])
        set_pathway_(model, UNION)
        lid = model._forward(feats[2:3, :50], lens[2:3]).lid_logits
        torch.testing.assert_close(out.lid_logits[2:3], lid)  # the unknown row keeps the LID that chose its pathway
        set_pathway_(model, int(lid.argmax()))
        chosen = model._forward(feats[2:3, :50], lens[2:3])
    torch.testing.assert_close(out.log_probs[2, : int(chosen.out_lens[0])], chosen.log_probs[0])
    # The pathways really differ: another language's mask gives other posteriors.
    with torch.no_grad():
        set_pathway_(model, 1)
        other = model._forward(feats[0:1], lens[0:1])
    assert (other.log_probs[0] - out.log_probs[0, : other.log_probs.shape[1]]).abs().max() > 1e-3


def test_the_sparse_serving_form_rebuilds_the_same_model_and_is_smaller_than_dense_float32():
    import io

    model = _pathway_model(n_paths=1)
    packed = pack_pruned(model)
    served = CTCLIDModel(vocab_size=30, num_languages=3, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, n_mels=20,
                         dropout=0.0, pathways=1).eval()
    unpack_pruned_(served, packed)
    feats, lens = torch.randn(2, 60, 20), torch.tensor([60, 45])
    with torch.no_grad():
        torch.testing.assert_close(served(feats, lens).log_probs, model(feats, lens).log_probs)

    def size(tensors: dict) -> int:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        return buf.tell()

    linears = {k: v for k, v in packed.items() if ".weight." in k}
    dense = {f"{name}.weight": w.detach() for name, w in latent_weights(model).items()}
    assert size(linears) < 0.6 * size(dense)  # 50 % of the blocks kept, one bit per block of masks


def test_a_model_cannot_be_both_quantized_and_pruned():
    with pytest.raises(ValueError, match="not both"):
        CTCLIDModel(vocab_size=30, num_languages=2, d_model=32, n_layers=1, n_heads=4, ffn_dim=64, weight_bits=1,
                    pathways=2)


def _prune_cfg(smoke_corpus, teacher, **kw):
    from pipeline.config.stages import PruneConfig

    manifests = f"{smoke_corpus}/manifests"
    return PruneConfig(init_checkpoint=teacher, train_manifest=f"{manifests}/labeled.jsonl",
                       dev_manifest=f"{manifests}/dev.jsonl", sparsity=0.5, round_updates=2, max_updates=4,
                       eval_every=4, save_every=2, log_every=2,
                       batch={"max_batch_duration_s": 40.0, "max_batch_size": 8, "num_buckets": 2},
                       optim={"name": "adamw", "lr": 1e-4, "warmup_updates": 1, "schedule": "constant"}, **kw)


def test_the_prune_stage_finds_a_pathway_per_language_trains_under_them_and_serves_sparse(smoke_corpus, teacher,
                                                                                           tmp_path, caplog):
    import logging

    from pipeline.config import label_tiny
    from pipeline.engine.decode import decode_features
    from pipeline.engine.model import load_trained
    from pipeline.stages.label import run_label
    from pipeline.stages.prune import run_prune
    from storage.pl import load_pseudo_labels

    cfg = _prune_cfg(smoke_corpus, teacher)
    run = str(tmp_path / "run")
    first = run_prune(cfg, run, stop_after=1)  # killed after the search and one update
    assert first.step == 1
    with caplog.at_level(logging.INFO, logger="mlpl.prune"):
        result = run_prune(cfg, run)
    assert result.step == 4
    assert sum("mask read back" in r.message for r in caplog.records) == 3  # the search is not done twice
    start, pruned = load_trained(teacher), load_trained(result.best_checkpoint)
    masks = {name: p.masks for name, p in pathway_masks(pruned.model).items()}
    assert pruned.checkpoint["model_kwargs"]["pathways"] == 3 == len(pruned.languages)
    for lang in ("es", "el", "sl"):
        assert result.extra["sparsity"][lang] == pytest.approx(0.5, abs=0.01)
    before, after = latent_weights(start.model), latent_weights(pruned.model)
    for name, m in masks.items():
        assert (m[:, ::8] == m[:, 7::8]).all()  # 8×1 blocks
        outside = ~m.any(dim=0)
        assert outside.any() and torch.equal(after[name][outside], before[name][outside])  # no pathway moved them
    assert not torch.equal(masks[next(iter(masks))][0], masks[next(iter(masks))][2])  # languages' masks differ
    extra = result.extra
    assert extra["packed_bytes"] < extra["float32_weights_bytes"]
    served = load_trained(extra["packed_checkpoint"])
    assert served.checkpoint["weights"] == "sparse" and "optimizer" not in served.checkpoint
    feats = [torch.randn(240, 80), torch.randn(150, 80), torch.randn(200, 80)]
    kw = dict(bf16=False, keep_log_probs=True, clip_languages=["sl", "es", None])
    a = decode_features(pruned.model, feats, tokenizer=pruned.tokenizer, languages=pruned.languages, **kw)
    b = decode_features(served.model, feats, tokenizer=served.tokenizer, languages=served.languages, **kw)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x["log_probs"], y["log_probs"])
    assert run_prune(cfg, run).cached
    from pipeline.config.stages import QuantizeConfig
    from pipeline.stages.quantize import run_quantize

    with pytest.raises(ValueError, match="is pruned"):  # one or the other, not both
        run_quantize(QuantizeConfig(init_checkpoint=result.best_checkpoint, train_manifest=cfg.train_manifest,
                                    max_updates=2, eval_every=2, save_every=2, optim=cfg.optim), str(tmp_path / "q"))
    root = str(tmp_path / "labels")
    manifests = f"{smoke_corpus}/manifests"
    run_label(label_tiny(f"{manifests}/unlabeled.jsonl", {lang: extra["packed_checkpoint"]
                                                          for lang in ("es", "el", "sl")}), root)
    assert len(load_pseudo_labels(root)) > 0


def test_language_agnostic_lth_pruning_keeps_one_mask_and_a_pathway_config_needs_one_language_batches(
        smoke_corpus, teacher, tmp_path):
    from pydantic import ValidationError

    from pipeline.engine.model import load_trained
    from pipeline.stages.prune import run_prune

    result = run_prune(_prune_cfg(smoke_corpus, teacher, method="agnostic", mask_search="lth",
                                  language_mix={"kind": "natural"}), str(tmp_path))
    pruned = load_trained(result.best_checkpoint)
    assert pruned.checkpoint["model_kwargs"]["pathways"] == 1
    assert result.extra["sparsity"] == {"all": pytest.approx(0.5, abs=0.01)}
    with pytest.raises(ValidationError, match="one-language batches|batches of that language"):
        _prune_cfg(smoke_corpus, teacher, language_mix={"kind": "natural"})


def test_mlpl_prune_runs_the_stage_and_names_the_sparse_checkpoint(smoke_corpus, teacher, tmp_path, capsys):
    from flows.cli import main

    manifests = f"{smoke_corpus}/manifests"
    assert main(["prune", "--init", teacher, "--train", f"{manifests}/labeled.jsonl", "--run-dir", str(tmp_path),
                 "--method", "agnostic", "--sparsity", "0.3", "--max-updates", "2",
                 "--set", "round_updates=1", "--set", "eval_every=2"]) == 0
    out = capsys.readouterr().out
    assert "sparse checkpoint" in out and (tmp_path / "prune/agnostic-imp/checkpoints/packed.pt").exists()
