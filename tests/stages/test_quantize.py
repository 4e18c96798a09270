"""Weights-only QAT (USM binarization): absmean 1-bit and asymmetric 2/4-bit fake quantization in sub-channel
blocks, straight-through gradients, packing whose size reflects the bit width, packed inference = fake-quant."""

from __future__ import annotations

import io

import pytest
import torch

from models.encoder import CTCLIDModel
from models.quant import (
    block_size,
    dequantize,
    encoder_linears,
    fake_quantize,
    fake_quantize_model_,
    float_weights_,
    pack_codes,
    pack_model,
    quantize,
    unpack_codes,
    unpack_model_,
)


def _model(**kw) -> CTCLIDModel:
    torch.manual_seed(0)
    return CTCLIDModel(vocab_size=30, num_languages=3, d_model=64, n_layers=2, n_heads=4, ffn_dim=128, n_mels=20,
                       dropout=0.0, **kw)


def test_binarized_weights_take_two_values_per_block_with_the_absmean_scale():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    q = fake_quantize(w, bits=1, block=64)
    for row in range(8):
        for b in range(2):
            block, orig = q[row, 64 * b : 64 * (b + 1)], w[row, 64 * b : 64 * (b + 1)]
            scale = orig.abs().mean().half().float()
            assert set(block.tolist()) <= {scale.item(), -scale.item()}
            assert torch.equal(block > 0, orig >= 0)


@pytest.mark.parametrize("bits", [2, 4])
def test_asymmetric_codes_cover_each_block_min_to_max_within_half_a_step(bits):
    torch.manual_seed(1)
    w = torch.randn(6, 96)
    codes, scale, low = quantize(w, bits, block=32)
    assert codes.max() <= 2**bits - 1 and scale.shape == low.shape == (6, 3)
    q = dequantize(codes, scale, low, bits)
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((q - w).abs() <= step / 2 + 1e-3).all()
    assert len(torch.unique(q[0, :32])) <= 2**bits


def test_blocks_fall_back_to_the_largest_divisor():
    assert block_size(144, 64) == 48 and block_size(576, 64) == 64 and block_size(84, 64) == 42
    assert block_size(7, 64) == 7


def test_gradients_pass_straight_through():
    w = torch.randn(4, 64, requires_grad=True)
    (fake_quantize(w, 1) * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(4, 64))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_pack_and_unpack_exactly(bits):
    codes = torch.randint(0, 2**bits, (5, 37), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, (5, 37)), codes)


def test_the_packed_1_bit_model_is_over_10x_smaller_and_computes_what_the_fake_quantized_one_did():
    model = _model(encoder="conformer")
    names = fake_quantize_model_(model, bits=1)
    assert names and all(n.startswith("layers.") for n in names)
    feats, lens = torch.randn(2, 90, 20), torch.tensor([90, 61])
    with torch.no_grad():
        fake = model.eval()(feats, lens)
    packed = pack_model(model, bits=1)
    float_weights_(model)
    plain = _model(encoder="conformer")
    unpack_model_(plain, packed)
    with torch.no_grad():
        served = plain.eval()(feats, lens)
    torch.testing.assert_close(served.log_probs, fake.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served.lid_logits, fake.lid_logits, atol=1e-5, rtol=1e-5)

    def size(tensors: dict) -> int:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        return buf.tell()

    quantized = {f"{n}.weight": m.weight for n, m in encoder_linears(model).items()}
    packed_part = {k: v for k, v in packed.items() if ".weight." in k}
    assert size(quantized) >= 10 * size(packed_part)


def test_float_weights_survive_qat_updates_and_the_fake_quantization_comes_off():
    model = _model()
    fake_quantize_model_(model, bits=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 60, 20), torch.tensor([60, 40])).log_probs.mean().backward()
    opt.step()
    float_weights_(model)
    after = model.state_dict()
    assert set(after) == {k.replace(".parametrizations.weight.original", ".weight") for k in before}
    w = after["layers.0.ffn.0.weight"]
    assert not torch.equal(w, before["layers.0.ffn.0.parametrizations.weight.original"])
    assert len(torch.unique(w[0, :64])) > 4  # float again, not 2-bit codes


# --- the quantize stage on the smoke corpus ------------------------------------------------------------------


def test_the_quantize_stage_trains_1_bit_packs_it_and_labels_with_the_packed_model(smoke_corpus, teacher, tmp_path):
    from pipeline.config import label_tiny
    from pipeline.config.stages import QuantizeConfig
    from pipeline.engine.decode import decode_features
    from pipeline.engine.model import load_trained
    from pipeline.stages.label import run_label
    from pipeline.stages.quantize import run_quantize
    from storage.pl import load_pseudo_labels

    manifests = f"{smoke_corpus}/manifests"
    cfg = QuantizeConfig(init_checkpoint=teacher, train_manifest=f"{manifests}/labeled.jsonl",
                         dev_manifest=f"{manifests}/dev.jsonl", bits=1, max_updates=6, eval_every=6, save_every=6,
                         log_every=3, batch={"max_batch_duration_s": 60.0, "max_batch_size": 8, "num_buckets": 2},
                         optim={"name": "adamw", "lr": 1e-4, "warmup_updates": 1, "schedule": "constant"})
    result = run_quantize(cfg, str(tmp_path / "run"))
    extra = result.extra
    assert result.step == 6 and extra["float32_weights_bytes"] > 4 * extra["packed_bytes"]
    qat, served = load_trained(result.best_checkpoint), load_trained(extra["packed_checkpoint"])
    assert served.checkpoint["weights"] == "packed" and "optimizer" not in served.checkpoint
    w = served.model.layers[0].ffn[0].weight
    assert len(torch.unique(w[0, :48].abs())) == 1  # one magnitude per block: binarized (d 144: blocks of 48)
    feats = [torch.randn(240, 80), torch.randn(150, 80)]
    kw = dict(bf16=False, keep_log_probs=True, clip_languages=["sl", "es"])
    a = decode_features(qat.model, feats, tokenizer=qat.tokenizer, languages=qat.languages, **kw)
    b = decode_features(served.model, feats, tokenizer=served.tokenizer, languages=served.languages, **kw)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x["log_probs"], y["log_probs"], atol=1e-4, rtol=1e-4)
    assert run_quantize(cfg, str(tmp_path / "run")).cached  # a rerun reuses it, packed file and all
    root = str(tmp_path / "labels")
    packed_teachers = {lang: extra["packed_checkpoint"] for lang in ("es", "el", "sl")}
    run_label(label_tiny(f"{manifests}/unlabeled.jsonl", packed_teachers), root)
    assert len(load_pseudo_labels(root)) > 0


def test_mlpl_quantize_runs_the_stage_and_names_the_packed_checkpoint(smoke_corpus, teacher, tmp_path, capsys):
    from flows.cli import main

    manifests = f"{smoke_corpus}/manifests"
    assert main(["quantize", "--init", teacher, "--train", f"{manifests}/labeled.jsonl", "--run-dir",
                 str(tmp_path), "--bits", "2", "--max-updates", "2", "--set", "eval_every=2"]) == 0
    out = capsys.readouterr().out
    assert "packed 2-bit checkpoint" in out and (tmp_path / "quantize/2bit/checkpoints/packed.pt").exists()
