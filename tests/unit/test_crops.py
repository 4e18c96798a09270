"""Crop-and-stitch (paper Sec. 5.2): spans, the most-central stitch rule, equality with the uncropped forward for
a model with limited context, lengths, LID, batching and model mode."""

from __future__ import annotations

import pytest
import torch

from models.encoder import CTCLIDModel, frames_after_subsampling
from pipeline.engine.crops import crop_and_stitch, crop_spans, pad_time_to_multiple, stitch_owners

CROP, OVERLAP = 1000, 200


def _model(n_layers: int) -> CTCLIDModel:
    torch.manual_seed(0)
    model = CTCLIDModel(
        vocab_size=20, num_languages=3, d_model=32, n_layers=n_layers, n_heads=4, ffn_dim=64, dropout=0.0
    )
    return model.eval()


def _batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    feats = torch.randn(len(lengths), max(lengths), 80)
    for b, n in enumerate(lengths):
        feats[b, n:] = 0.0
    return feats, torch.tensor(lengths)


@pytest.mark.parametrize(("crop", "overlap", "stride"), [(1000, 200, 3), (1000, 0, 3), (100, 97, 3), (64, 16, 4)])
def test_spans_cover_the_clip_with_aligned_evenly_spread_overlapping_crops(crop, overlap, stride):
    for n in range(0, 4 * crop):
        spans = crop_spans(n, crop_frames=crop, overlap_frames=overlap, stride=stride)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(s % stride == 0 and e - s <= crop for s, e in spans)
        assert all(a[0] < b[0] and a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:], strict=False))
        if n <= crop:
            assert spans == [(0, n)]
        else:
            assert spans[-1][1] - spans[-1][0] > crop - stride  # no tiny last crop
            steps = [b[0] - a[0] for a, b in zip(spans, spans[1:], strict=False)]
            assert max(steps) - min(steps) <= stride  # evenly spread


@pytest.mark.parametrize(
    ("crop", "overlap", "match"),
    [
        (1000, 1000, "overlap_frames=1000"),
        (1000, 999, "cannot advance"),
        (1000, -1, "overlap_frames=-1"),
        (10, 2, "crop_frames=10"),
    ],
)
def test_spans_refuse_settings_that_cannot_work(crop, overlap, match):
    with pytest.raises(ValueError, match=match):
        crop_spans(5000, crop_frames=crop, overlap_frames=overlap, stride=3)


def test_each_output_frame_comes_from_the_crop_where_it_is_most_central():
    spans = [(0, 300), (150, 450), (300, 600)]  # output frames 0-99, 50-149, 100-199
    owners = stitch_owners(spans, 200, kernel=7, stride=3)
    # Each overlap splits at its middle: frame 74 is 25 frames from crop 0's end and 24 from crop 1's start, so
    # crop 0 keeps 0-74, crop 1 takes 75-124 and crop 2 the rest.
    assert owners.tolist() == [0] * 75 + [1] * 50 + [2] * 75
    for j in range(200):
        margins = [min(j - s // 3, s // 3 + 99 - j) if s // 3 <= j <= s // 3 + 99 else -1 for s, _ in spans]
        assert owners[j] == margins.index(max(margins))  # the most central crop; ties go to the earlier one


def test_a_tie_goes_to_the_earlier_crop():
    spans = [(0, 30), (15, 45)]  # output frames 0-9 and 5-14: frame 7 is 2 from both nearer edges
    assert stitch_owners(spans, 15, kernel=7, stride=3).tolist() == [0] * 8 + [1] * 7


def test_stitched_output_equals_the_uncropped_one_for_a_model_with_limited_context():
    model = _model(n_layers=0)  # conv front end only: 7 fbank frames of context
    lengths = [3500, 2200, 700]
    feats, lens = _batch(lengths)
    with torch.inference_mode():
        whole = model(feats, lens)
        cropped = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP)
    assert cropped.log_probs.shape == whole.log_probs.shape and cropped.log_probs.dtype == torch.float32
    assert torch.equal(cropped.out_lens, whole.out_lens)
    assert cropped.out_lens.tolist() == [frames_after_subsampling(n) for n in lengths]
    for b, n in enumerate(whole.out_lens.tolist()):
        torch.testing.assert_close(cropped.log_probs[b, :n], whole.log_probs[b, :n], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(cropped.log_probs).all()
    # One crop: the plain forward's LID. Several: crop means weighted by contributed frames, which is not the
    # whole-clip mean (a crop's mean also counts the frames it gives away), so only the weighting is checked below.
    torch.testing.assert_close(cropped.lid_logits[2], whole.lid_logits[2], atol=1e-5, rtol=1e-5)


def test_lid_is_the_crops_lid_weighted_by_the_frames_each_contributes():
    model = _model(n_layers=0)
    feats, lens = _batch([3500])
    spans = crop_spans(3500, crop_frames=CROP, overlap_frames=OVERLAP, stride=3)
    owners = stitch_owners(spans, frames_after_subsampling(3500), kernel=7, stride=3)
    with torch.inference_mode():
        cropped = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP)
        per_crop = [model(feats[:, s:e], torch.tensor([e - s])).lid_logits[0] for s, e in spans]
    expected = sum(lid * float((owners == c).sum()) / len(owners) for c, lid in enumerate(per_crop))
    torch.testing.assert_close(cropped.lid_logits[0], expected, atol=1e-5, rtol=1e-5)


def test_with_global_attention_crops_change_the_output_but_not_its_shape():
    model = _model(n_layers=2)
    feats, lens = _batch([3500, 700])
    with torch.inference_mode():
        whole = model(feats, lens)
        cropped = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP)
    assert cropped.log_probs.shape == whole.log_probs.shape and torch.equal(cropped.out_lens, whole.out_lens)
    n = int(whole.out_lens[0])
    assert not torch.allclose(cropped.log_probs[0, :n], whole.log_probs[0, :n], atol=1e-3)  # not vacuous


def test_a_clip_no_longer_than_a_crop_gets_the_plain_forward_output():
    model = _model(n_layers=2)
    feats, lens = _batch([3500, 1000, 700])
    with torch.inference_mode():
        cropped = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP)
        for b in (1, 2):
            alone = model(feats[b : b + 1, : lens[b]], lens[b : b + 1])
            n = int(alone.out_lens[0])
            torch.testing.assert_close(cropped.log_probs[b, :n], alone.log_probs[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cropped.lid_logits[b], alone.lid_logits[0], atol=1e-5, rtol=1e-5)


def test_crops_of_all_clips_share_forwards_and_chunking_does_not_change_the_result():
    model = _model(n_layers=1)
    feats, lens = _batch([3500, 2200, 700])  # 5 + 3 + 1 crops
    calls = []
    model.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape))
    with torch.inference_mode():
        one = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP)
        chunked = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP, max_crops_per_forward=4)
    assert [c[0] for c in calls] == [9, 4, 4, 1] and all(c[1] <= CROP for c in calls)
    assert calls[-1][1] == 700  # a chunk is padded to its own longest crop
    torch.testing.assert_close(chunked.log_probs, one.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.lid_logits, one.lid_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_crop_and_stitch_keeps_the_model_mode_under_inference_mode(training):
    model = _model(n_layers=1).train(training)
    feats, lens = _batch([2500])
    with torch.inference_mode():
        out = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP, bf16=True)
    assert model.training == training
    assert out.log_probs.dtype == torch.float32 and torch.isfinite(out.log_probs).all()


def test_padding_batches_to_a_multiple_of_64_frames_is_exact_and_bounds_the_shapes_the_model_sees():
    model = _model(n_layers=2)
    feats, lens = _batch([3500, 1000, 650])
    shapes = []
    model.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    with torch.inference_mode():
        plain = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP)
        padded = crop_and_stitch(model, feats, lens, crop_frames=CROP, overlap_frames=OVERLAP, pad_multiple=64)
        whole = model(pad_time_to_multiple(feats[2:, :650], 64), lens[2:])
    assert shapes[1][1] % 64 == 0 and shapes[1][1] >= shapes[0][1] and shapes[2] == (1, 704, 80)
    torch.testing.assert_close(padded.log_probs, plain.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.lid_logits, plain.lid_logits, atol=1e-5, rtol=1e-5)
    n = int(whole.out_lens[0])
    torch.testing.assert_close(whole.log_probs[0, :n], plain.log_probs[2, :n], atol=1e-5, rtol=1e-5)
    assert pad_time_to_multiple(feats, 1) is feats and pad_time_to_multiple(feats[:, :640], 64).shape[1] == 640
