"""Crop-and-stitch: spans, the most-central stitch rule, equality with the uncropped forward for a model with
limited context, lengths and LID."""

from __future__ import annotations

import pytest
import torch

from models.encoder import CTCLIDModel, frames_after_subsampling
from pipeline.crops import crop_and_stitch, crop_spans, stitch_owners


def _model(n_layers: int) -> CTCLIDModel:
    torch.manual_seed(0)
    model = CTCLIDModel(vocab_size=20, num_languages=3, d_model=32, n_layers=n_layers, n_heads=4, ffn_dim=64,
                        dropout=0.0)
    return model.eval()


def _batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    feats = torch.randn(len(lengths), max(lengths), 80)
    for b, n in enumerate(lengths):
        feats[b, n:] = 0.0
    return feats, torch.tensor(lengths)


@pytest.mark.parametrize("n", [1, 700, 1000, 1001, 2200, 3500, 7531])
def test_spans_cover_the_clip_with_aligned_overlapping_crops(n):
    spans = crop_spans(n, crop_frames=1000, overlap_frames=200, stride=3)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(s % 3 == 0 and 0 < e - s <= 1000 for s, e in spans)
    assert all(a[1] - b[0] >= 200 for a, b in zip(spans, spans[1:], strict=False))  # overlaps
    assert all(b[0] > a[0] for a, b in zip(spans, spans[1:], strict=False))  # crops advance
    if n <= 1000:
        assert spans == [(0, n)]


def test_spans_refuse_an_overlap_that_cannot_advance():
    with pytest.raises(ValueError, match="cannot advance"):
        crop_spans(5000, crop_frames=1000, overlap_frames=1000, stride=3)


def test_each_output_frame_comes_from_the_crop_where_it_is_most_central():
    spans = [(0, 300), (150, 450), (300, 600)]  # output frames 0-99, 50-149, 100-199
    owners = stitch_owners(spans, 200, kernel=7, stride=3)
    # Overlap 50-99 of crops 0 and 1 splits at its middle: up to frame 74 crop 0 is more central (a tie
    # at 74/75 goes to the earlier crop), then crop 1.
    assert owners[:75].tolist() == [0] * 75 and owners[75:125].tolist() == [1] * 50
    assert owners[125:].tolist() == [2] * 75
    for j in range(200):
        c = int(owners[j])
        first = spans[c][0] // 3
        margin = min(j - first, first + 99 - j)
        for s, _ in spans:
            if s // 3 <= j <= s // 3 + 99:
                assert margin >= min(j - s // 3, s // 3 + 99 - j)  # no other crop has it more centrally


def test_stitched_output_equals_the_uncropped_one_for_a_model_with_limited_context():
    model = _model(n_layers=0)  # conv front end only: 7 fbank frames of context
    feats, lens = _batch([3500, 2200, 700])
    with torch.inference_mode():
        whole = model(feats, lens)
        cropped = crop_and_stitch(model, feats, lens, crop_frames=1000, overlap_frames=200)
    assert torch.equal(cropped.out_lens, whole.out_lens)
    assert cropped.log_probs.shape == whole.log_probs.shape
    assert cropped.out_lens.tolist() == [int(frames_after_subsampling(n)) for n in (3500, 2200, 700)]
    for b, n in enumerate(whole.out_lens.tolist()):
        torch.testing.assert_close(cropped.log_probs[b, :n], whole.log_probs[b, :n], atol=1e-5, rtol=1e-5)
    # LID: each crop's utterance-level logits, weighted by the output frames the crop contributes.
    spans = crop_spans(3500, crop_frames=1000, overlap_frames=200, stride=3)
    owners = stitch_owners(spans, int(whole.out_lens[0]), kernel=7, stride=3)
    with torch.inference_mode():
        per_crop = [model(feats[:1, s:e], torch.tensor([e - s])).lid_logits[0] for s, e in spans]
    expected = sum(lid * float((owners == c).sum()) / len(owners) for c, lid in enumerate(per_crop))
    torch.testing.assert_close(cropped.lid_logits[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cropped.lid_logits[2], whole.lid_logits[2])  # one crop: the plain forward's
    assert not model.training


def test_with_global_attention_crops_change_the_output_but_not_its_shape():
    model = _model(n_layers=2)
    feats, lens = _batch([3500, 700])
    with torch.inference_mode():
        whole = model(feats, lens)
        cropped = crop_and_stitch(model, feats, lens, crop_frames=1000, overlap_frames=200, max_crops_per_forward=2)
    assert cropped.log_probs.shape == whole.log_probs.shape and torch.equal(cropped.out_lens, whole.out_lens)
    n = int(whole.out_lens[0])
    assert not torch.allclose(cropped.log_probs[0, :n], whole.log_probs[0, :n], atol=1e-4)  # the test is not vacuous
    # A clip shorter than one crop runs whole: exactly the plain forward's output.
    short = int(whole.out_lens[1])
    alone = model(feats[1:, :700], lens[1:])
    torch.testing.assert_close(cropped.log_probs[1, :short], alone.log_probs[0, :short], atol=1e-5, rtol=1e-5)


def test_crop_and_stitch_keeps_the_model_mode():
    model = _model(n_layers=1).train()
    feats, lens = _batch([2500])
    with torch.inference_mode():
        crop_and_stitch(model, feats, lens, crop_frames=1000, overlap_frames=200)
    assert model.training
