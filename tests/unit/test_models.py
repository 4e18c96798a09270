"""Tests for models/: shapes, padding invariance, long inputs, dropout controls, sizes, decoding, overfit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.decode import GreedyHypothesis, greedy_ctc_decode
from models.encoder import CTCLIDModel, ModelOutput, count_parameters, frames_after_subsampling
from models.loss import ctc_lid_loss

TINY = dict(d_model=144, n_layers=4, n_heads=4, ffn_dim=576)
BASE = dict(d_model=768, n_layers=36, n_heads=4, ffn_dim=3072)  # paper: 275 M
LARGE = dict(d_model=1536, n_layers=36, n_heads=4, ffn_dim=6144)  # paper: 1.06 B


def tiny_model(seed: int = 0, **overrides) -> CTCLIDModel:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=100, num_languages=4, **TINY) | overrides
    return CTCLIDModel(**kwargs)


def random_batch(lens: list[int], n_mels: int = 80, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lens), max(lens), n_mels, generator=g)  # (B, T, F)
    return feats, torch.tensor(lens)


# --- encoder -------------------------------------------------------------------------------------------


def test_frames_after_subsampling_matches_conv_and_tensor_form():
    model = tiny_model().eval()
    for n in [0, 1, 2, 3, 4, 7, 50, 101]:
        expected = model.conv(torch.zeros(1, 80, n)).shape[-1] if n > 0 else 0
        assert frames_after_subsampling(n) == expected
    lens = torch.tensor([0, 1, 3, 4, 100])
    assert frames_after_subsampling(lens).tolist() == [frames_after_subsampling(n) for n in lens.tolist()]


def test_output_shapes_dtypes_and_lengths():
    model = tiny_model().eval()
    feats, lens = random_batch([120, 90, 31])
    out = model(feats, lens)
    assert isinstance(out, ModelOutput)
    assert out.log_probs.shape == (3, 40, 100) and out.log_probs.dtype == torch.float32
    assert out.lid_logits.shape == (3, 4) and out.lid_logits.dtype == torch.float32
    assert torch.equal(out.out_lens, frames_after_subsampling(lens))
    assert torch.allclose(out.log_probs.exp().sum(-1), torch.ones(3, 40), atol=1e-5)


def test_padding_does_not_change_valid_outputs_or_lid():
    model = tiny_model().eval()
    feats, lens = random_batch([50])
    garbage = 100 * torch.randn(1, 40, 80)  # extra frames past the true length
    padded = torch.cat([feats, garbage], dim=1)
    with torch.no_grad():
        alone = model(feats, lens)
        batched = model(padded, lens)
    n = alone.out_lens.item()
    assert batched.log_probs.shape[1] > n
    assert torch.allclose(batched.log_probs[:, :n], alone.log_probs, atol=1e-5)
    assert torch.allclose(batched.lid_logits, alone.lid_logits, atol=1e-5)


def test_zero_length_utterance_gives_finite_outputs():
    model = tiny_model().eval()
    feats, _ = random_batch([30, 30])
    out = model(feats, torch.tensor([30, 0]))
    assert out.out_lens.tolist() == [10, 0]
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.lid_logits).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_runs_on_much_longer_input_than_training(autocast):
    # Tiny model trained on ~300-frame crops would see 2000 frames (6.7x) at labeling time.
    model = tiny_model().eval()
    feats, lens = random_batch([2000, 1500])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(feats, lens)
    assert out.log_probs.dtype == torch.float32 and out.lid_logits.dtype == torch.float32
    assert out.log_probs.shape == (2, 667, 100)
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.lid_logits).all()


def test_relative_bias_table_is_length_independent():
    model = tiny_model(max_relative_distance=8)
    idx = model._relative_index(50, torch.device("cpu"))
    assert idx.min() == 0 and idx.max() == 16  # table has 2K+1 entries whatever the length
    assert idx[0, 49] == 16 and idx[49, 0] == 0 and idx[10, 10] == 8


def test_set_dropout_reaches_every_dropout_and_eval_is_deterministic():
    model = tiny_model()
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 + 3 * TINY["n_layers"]  # input + per layer (attention, FFN, residual)
    model.set_dropout(0.5)
    assert all(m.p == 0.5 for m in dropouts)
    feats, lens = random_batch([60, 45])
    model.eval()
    with torch.no_grad():
        a, b = model(feats, lens), model(feats, lens)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.lid_logits, b.lid_logits)
    model.train()
    with torch.no_grad():
        c = model(feats, lens)
    assert not torch.allclose(c.log_probs, a.log_probs)
    model.set_dropout(0.0)
    assert all(m.p == 0.0 for m in dropouts)
    with torch.no_grad():
        d = model(feats, lens)
    assert torch.allclose(d.log_probs, a.log_probs, atol=1e-6)  # train without dropout == eval


def test_layerdrop_one_skips_every_layer_in_training_only():
    model = tiny_model(dropout=0.0)
    feats, lens = random_batch([60, 45])
    no_layers = copy.deepcopy(model)
    no_layers.layers = nn.ModuleList()
    model.set_layerdrop(1.0)
    with torch.no_grad():
        model.train()
        dropped = model(feats, lens)
        model.eval()
        kept = model(feats, lens)
        reference = no_layers.eval()(feats, lens)
        full = tiny_model(dropout=0.0).eval()(feats, lens)
    assert torch.allclose(dropped.log_probs, reference.log_probs, atol=1e-6)
    assert torch.allclose(kept.log_probs, full.log_probs, atol=1e-6)  # never in eval
    assert not torch.allclose(kept.log_probs, reference.log_probs)


@pytest.mark.parametrize(("shape", "paper_params"), [(BASE, 275e6), (LARGE, 1.06e9)], ids=["base", "large"])
def test_paper_sizes_param_counts(shape, paper_params):
    with torch.device("meta"):  # counts shapes without allocating 1 B floats
        model = CTCLIDModel(vocab_size=256, num_languages=60, **shape)
    n = count_parameters(model)
    assert abs(n - paper_params) / paper_params < 0.10, n


def test_tiny_param_count():
    assert 0.5e6 < count_parameters(tiny_model()) < 3e6


# --- loss ----------------------------------------------------------------------------------------------


def _loss_inputs(model: CTCLIDModel):
    feats, lens = random_batch([60, 45, 30])
    targets = torch.tensor([[5, 6, 7, 8], [9, 9, 3, 0], [4, 0, 0, 0]])
    target_lens = torch.tensor([4, 3, 1])
    lang_ids = torch.tensor([0, 3, 1])
    return model(feats, lens), targets, target_lens, lang_ids


def test_ctc_lid_loss_values_and_normalisation():
    model = tiny_model().eval()
    out, targets, target_lens, lang_ids = _loss_inputs(model)
    loss, info = ctc_lid_loss(out, targets, target_lens, lang_ids, lid_weight=0.0)
    assert set(info) == {"loss", "ctc", "lid", "lid_acc"}
    assert loss.item() == pytest.approx(info["ctc"]) and info["loss"] == pytest.approx(info["ctc"])
    per_utt = F.ctc_loss(out.log_probs.transpose(0, 1), targets, out.out_lens, target_lens, reduction="none")
    assert info["ctc"] == pytest.approx(per_utt.sum().item() / 8, rel=1e-5)  # summed / total tokens
    loss2, info2 = ctc_lid_loss(out, targets, target_lens, lang_ids, lid_weight=0.5)
    assert info2["lid"] == pytest.approx(F.cross_entropy(out.lid_logits, lang_ids).item(), rel=1e-5)
    assert loss2.item() == pytest.approx(info2["ctc"] + 0.5 * info2["lid"], rel=1e-5)
    assert 0.0 <= info2["lid_acc"] <= 1.0


@pytest.mark.parametrize("lid_weight", [0.0, 1.0])
def test_lid_head_gets_gradient_only_with_positive_weight(lid_weight):
    model = tiny_model()
    out, targets, target_lens, lang_ids = _loss_inputs(model)
    loss, _ = ctc_lid_loss(out, targets, target_lens, lang_ids, lid_weight=lid_weight)
    loss.backward()
    lid_grad = model.lid_head.weight.grad
    has_lid_grad = lid_grad is not None and lid_grad.abs().sum().item() > 0
    assert has_lid_grad == (lid_weight > 0)
    assert model.ctc_head.weight.grad.abs().sum().item() > 0


# --- greedy decoding ------------------------------------------------------------------------------------


def _frames(argmax: list[int], max_probs: list[float], vocab: int = 4) -> torch.Tensor:
    """(T, V) log-probs whose argmax and max probability per frame are given; the rest is spread evenly."""
    rows = []
    for a, p in zip(argmax, max_probs, strict=True):
        row = torch.full((vocab,), (1 - p) / (vocab - 1))
        row[a] = p
        rows.append(row)
    return torch.stack(rows).log()


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    utt1 = _frames([1, 1, 0, 1, 2, 2, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.9, 0.5, 0.6, 0.8])
    utt2 = _frames([3, 0, 3, 1, 1, 1, 1, 1], [0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])  # 3 valid frames
    utt3 = _frames([2] * 8, [0.9] * 8)  # length 0
    log_probs = torch.stack([utt1, utt2, utt3])  # (3, 8, 4)
    hyps = greedy_ctc_decode(log_probs, torch.tensor([8, 3, 0]))
    assert hyps[0].tokens == [1, 1, 2]  # a blank between equal tokens keeps both
    assert hyps[0].confidence == pytest.approx(sum([0.9, 0.8, 0.7, 0.6, 0.9, 0.5, 0.6, 0.8]) / 8)
    assert hyps[0].blank_ratio == pytest.approx(3 / 8)
    assert hyps[1].tokens == [3, 3]  # frames past the length are ignored
    assert hyps[1].confidence == pytest.approx(0.8)
    assert hyps[1].blank_ratio == pytest.approx(1 / 3)
    assert hyps[2] == GreedyHypothesis(tokens=[], confidence=0.0, blank_ratio=1.0)


def test_greedy_decode_all_blank():
    hyp = greedy_ctc_decode(_frames([0, 0, 0], [0.5, 0.5, 0.5])[None], torch.tensor([3]))[0]
    assert hyp.tokens == [] and hyp.blank_ratio == 1.0 and hyp.confidence == pytest.approx(0.5)


# --- overfit --------------------------------------------------------------------------------------------


def _synthetic_utterances(targets_list: list[list[int]], lang_ids: list[int], n_mels: int = 80):
    """Fake speech: each token is 15 frames of its own spectral pattern, 6 'silence' frames between."""
    token_pattern = torch.randn(8, n_mels)  # row 0 doubles as silence (the blank's pattern)
    lang_pattern = 0.5 * torch.randn(2, n_mels)  # a per-language offset, like an accent
    utts = []
    for tokens, lang in zip(targets_list, lang_ids, strict=True):
        segments = [token_pattern[0].expand(6, n_mels)]
        for v in tokens:
            segments += [token_pattern[v].expand(15, n_mels), token_pattern[0].expand(6, n_mels)]
        x = torch.cat(segments) + lang_pattern[lang]  # (T, F)
        utts.append(x + 0.3 * torch.randn_like(x))
    feats = nn.utils.rnn.pad_sequence(utts, batch_first=True)  # (B, T, F)
    return feats, torch.tensor([len(u) for u in utts])


def test_tiny_model_overfits_four_utterances():
    torch.manual_seed(0)
    targets_list = [[1, 2, 3], [4, 5], [6, 1, 7, 2], [3, 3, 5]]  # [3, 3, 5] needs a blank between the 3s
    lang_ids = torch.tensor([0, 1, 0, 1])
    feats, lens = _synthetic_utterances(targets_list, lang_ids.tolist())
    targets = nn.utils.rnn.pad_sequence([torch.tensor(t) for t in targets_list], batch_first=True)
    target_lens = torch.tensor([len(t) for t in targets_list])
    model = CTCLIDModel(
        vocab_size=8, num_languages=2, d_model=64, n_layers=2, n_heads=4, ffn_dim=256, dropout=0.0
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss, info = ctc_lid_loss(model(feats, lens), targets, target_lens, lang_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(info["loss"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    model.eval()
    with torch.no_grad():
        out = model(feats, lens)
    assert [h.tokens for h in greedy_ctc_decode(out.log_probs, out.out_lens)] == targets_list
    assert out.lid_logits.argmax(-1).tolist() == lang_ids.tolist()


def test_matmul_flops_match_torchs_flop_counter_on_the_math_attention_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = CTCLIDModel(vocab_size=40, num_languages=3, d_model=48, n_layers=2, n_heads=4, ffn_dim=96, n_mels=20)
    model.eval()
    for n in (90, 301):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(torch.randn(1, n, 20), torch.tensor([n]))
        # The counter also counts the LID mean (a tiny reduction it sees as a matmul); the rest must agree.
        assert model.matmul_flops(n) == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_inference_attention_per_utterance_equals_the_masked_batch_path_and_follows_weight_changes():
    torch.manual_seed(0)
    model = CTCLIDModel(vocab_size=30, num_languages=2, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, n_mels=20,
                        max_relative_distance=5)
    for layer in model.layers:
        nn.init.normal_(layer.attn.rel_bias)
    model.eval()
    feats, lens = torch.randn(3, 200, 20), torch.tensor([200, 150, 61])
    with torch.inference_mode():
        fast = model(feats, lens)  # per-utterance attention, cached Toeplitz bias
    reference = model(feats, lens)  # grad enabled: the training path with one (B, H, T, T) mask
    for b, n in enumerate(fast.out_lens.tolist()):
        assert torch.allclose(fast.log_probs[b, :n], reference.log_probs[b, :n], atol=1e-5)
    assert torch.allclose(fast.lid_logits, reference.lid_logits, atol=1e-5)
    attn = model.layers[0].attn
    assert torch.equal(attn.relative_bias(7, torch.float32)[1],
                       attn.rel_bias.detach()[1][(torch.arange(7)[None] - torch.arange(7)[:, None]).clamp(-5, 5) + 5])
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.rel_bias.add_(torch.randn_like(layer.attn.rel_bias))  # an optimizer step: no stale table
        after = model(feats, lens)
    reference = model(feats, lens)
    assert torch.allclose(after.log_probs[0], reference.log_probs[0], atol=1e-5)


# --- capacity options (Li et al. 2021): Conformer layers, language conditioning, activation checkpointing ------


def test_conformer_layers_keep_padding_invariance_and_the_inference_attention_path():
    model = tiny_model(encoder="conformer", n_layers=2, conformer_conv_kernel=5)
    assert all(type(layer).__name__ == "ConformerLayer" for layer in model.layers)
    for layer in model.layers:  # nonzero position bias, so a padding leak through attention or the conv would show
        nn.init.normal_(layer.attn.rel_bias)
    model.eval()
    feats, lens = random_batch([50, 31])
    padded = torch.cat([feats, 100 * torch.randn(2, 40, 80)], dim=1)
    with torch.no_grad():
        batched = model(padded, lens)  # grad off: per-utterance attention
        alone = [model(feats[b : b + 1, : lens[b]], lens[b : b + 1]) for b in range(2)]
    masked = model(padded, lens)  # grad on: the training path's masked attention
    for b, a in enumerate(alone):
        n = int(a.out_lens[0])
        assert torch.allclose(batched.log_probs[b, :n], a.log_probs[0], atol=1e-5)
        assert torch.allclose(masked.log_probs[b, :n], a.log_probs[0], atol=1e-5)
        assert torch.allclose(batched.lid_logits[b], a.lid_logits[0], atol=1e-5)


def test_conformer_matmul_flops_match_torchs_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = CTCLIDModel(vocab_size=40, num_languages=3, d_model=48, n_layers=2, n_heads=4, ffn_dim=96, n_mels=20,
                        encoder="conformer", conformer_conv_kernel=7).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(1, 301, 20), torch.tensor([301]))
    assert model.matmul_flops(301) == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_an_unknown_encoder_or_an_even_conformer_kernel_is_refused():
    with pytest.raises(ValueError, match="encoder='lstm'"):
        tiny_model(encoder="lstm")
    with pytest.raises(ValueError, match="must be odd"):
        tiny_model(encoder="conformer", conformer_conv_kernel=4)


def test_language_conditioning_reads_the_language_and_runs_with_unknown():
    model = tiny_model(language_conditioning=True)
    emb = model.language_embedding
    assert emb.num_embeddings == 5 and not emb.weight.any()  # 4 languages + unknown, zero init
    plain = tiny_model()  # same seed: the same weights apart from the embedding
    feats, lens = random_batch([60, 45])
    with torch.no_grad():
        # Zero embedding: the conditioned model starts as the unconditioned one.
        assert torch.allclose(model.eval()(feats, lens, torch.tensor([0, 1])).log_probs,
                              plain.eval()(feats, lens).log_probs, atol=1e-6)
        nn.init.normal_(emb.weight)
        known = model(feats, lens, torch.tensor([0, 1]))
        swapped = model(feats, lens, torch.tensor([1, 0]))
        none = model(feats, lens)  # no language given: every row "unknown"
        minus_one = model(feats, lens, torch.tensor([-1, -1]))
        out_of_range = model(feats, lens, torch.tensor([7, -3]))
    assert not torch.allclose(known.log_probs, swapped.log_probs)
    assert torch.equal(none.log_probs, minus_one.log_probs) and torch.equal(none.log_probs, out_of_range.log_probs)
    assert not torch.allclose(none.log_probs, known.log_probs)
    assert all(len(h.tokens) <= int(n) for h, n in zip(greedy_ctc_decode(none.log_probs, none.out_lens),
                                                        none.out_lens, strict=True))  # decodes


def test_language_is_hidden_in_training_only_at_the_configured_rate():
    model = tiny_model(language_conditioning=True, language_unknown_prob=0.25)
    ids = torch.zeros(4000, dtype=torch.long)
    model.train()
    rows = model._language_rows(ids, 4000, torch.device("cpu"))
    assert set(rows.tolist()) == {0, 4} and (rows == 4).float().mean().item() == pytest.approx(0.25, abs=0.03)
    model.eval()
    assert model._language_rows(ids, 4000, torch.device("cpu")).eq(0).all()


@pytest.mark.parametrize("encoder", ["transformer", "conformer"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(encoder):
    feats, lens = random_batch([80, 60])
    targets, target_lens, lang_ids = torch.randint(1, 100, (2, 8)), torch.tensor([8, 5]), torch.tensor([0, 2])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(encoder=encoder, n_layers=2, activation_checkpointing=checkpointing, dropout=0.0)
        loss, _ = ctc_lid_loss(model(feats, lens, lang_ids), targets, target_lens, lang_ids, lid_weight=0.1)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1], strict=True))
