"""Weights-only quantization-aware training (Rybakov et al., USM binarization) and the packed form of its weights.

Linear weights are fake-quantized in the forward pass, per output row in sub-channel blocks of `block` input
weights, with straight-through gradients to the float weights they are kept as:
- 1 bit: absmean binarization, w ≈ sign(w) · mean|w| over the block (two values per block);
- 2-8 bits: asymmetric, w ≈ min + code · (max − min) / (2^bits − 1), codes 0 … 2^bits − 1 over the block.
Scales and minimums go through float16, exactly as they are packed, so that the packed weights dequantize to the
very weights the fake-quantized model computes with. Model math only: no I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

SUPPORTED_BITS = (1, 2, 4, 8)


def _check(bits: int, block: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not one of {SUPPORTED_BITS}")
    if block < 1:
        raise ValueError(f"block={block} must be at least 1")


def block_size(in_features: int, block: int) -> int:
    """The sub-channel block used for rows of `in_features`: the largest divisor not above `block` (144 → 48)."""
    return max(d for d in range(1, min(block, in_features) + 1) if in_features % d == 0)


def _blocks(w: Tensor, block: int) -> Tensor:
    """(out, in) → (out, blocks, size) with size = `block_size(in, block)`."""
    out, inp = w.shape
    size = block_size(inp, block)
    return w.reshape(out, inp // size, size)


def quantize(w: Tensor, bits: int, block: int = 64) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integer codes (out, in) uint8, scale (out, blocks) float16 and, above 1 bit, minimum (out, blocks) float16."""
    _check(bits, block)
    b = _blocks(w.detach().float(), block)  # (out, nb, size)
    if bits == 1:
        scale = b.abs().mean(dim=-1).half()  # (out, nb)
        codes = (b >= 0).to(torch.uint8)  # 1: +scale, 0: −scale
        return codes.reshape(w.shape), scale, None
    levels = 2**bits - 1
    low, high = b.amin(dim=-1).half(), b.amax(dim=-1).half()  # (out, nb)
    scale = ((high.float() - low.float()) / levels).clamp(min=1e-8).half()
    codes = torch.round((b - low.float()[..., None]) / scale.float()[..., None]).clamp(0, levels).to(torch.uint8)
    return codes.reshape(w.shape), scale, low


def dequantize(codes: Tensor, scale: Tensor, low: Tensor | None, bits: int) -> Tensor:
    """The float32 weights (out, in) that `quantize`'s codes stand for."""
    out, inp = codes.shape
    nb = scale.shape[1]
    c = codes.reshape(out, nb, inp // nb).float()
    if bits == 1:
        w = (2 * c - 1) * scale.float()[..., None]
    else:
        w = low.float()[..., None] + c * scale.float()[..., None]
    return w.reshape(out, inp)


def fake_quantize(w: Tensor, bits: int, block: int = 64) -> Tensor:
    """`w` quantized and dequantized in the forward pass; the gradient passes straight through to `w`."""
    q = dequantize(*quantize(w, bits, block), bits).to(w.dtype)
    return w + (q - w).detach()


class FakeQuantize(nn.Module):
    """A parametrization: the weight a layer computes with is its float weight fake-quantized."""

    def __init__(self, bits: int, block: int):
        super().__init__()
        _check(bits, block)
        self.bits, self.block = bits, block

    def forward(self, w: Tensor) -> Tensor:
        return fake_quantize(w, self.bits, self.block)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the encoder layers (attention, FFN, Conformer pointwise convs): what is quantized
    and pruned. The conv front end, the CTC and LID heads and the language embedding stay as they are (a few % of
    the weights)."""
    layers = getattr(model, "layers", model)
    return {f"layers.{name}": m for name, m in layers.named_modules() if isinstance(m, nn.Linear)}


def stored_weight(m: nn.Linear) -> Tensor:
    """The weight a layer keeps (what an optimizer updates), under a parametrization or not."""
    return m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight


def fake_quantize_model_(model: nn.Module, bits: int, block: int = 64) -> list[str]:
    """Fake-quantize the weights of `encoder_linears(model)` in place; their names."""
    linears = encoder_linears(model)
    for m in linears.values():
        if not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", FakeQuantize(bits, block))
    return list(linears)


def float_weights_(model: nn.Module) -> None:
    """Remove the fake quantization, keeping the float weights (what QAT trains and checkpoints save)."""
    for m in encoder_linears(model).values():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes below 2^bits, packed 8 / bits to a byte (flattened, zero-padded to whole bytes)."""
    per_byte = 8 // bits
    flat = codes.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per_byte)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """The inverse of `pack_codes`: uint8 codes of `shape`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = (packed[:, None] >> shifts) & (2**bits - 1)
    return codes.flatten()[: math.prod(shape)].reshape(shape)


def pack_model(model: nn.Module, bits: int, block: int = 64) -> dict[str, Tensor]:
    """The model's state as tensors to save: each quantizable linear weight as packed codes + float16 scales
    (+ minimums), everything else as it is. `unpack_model_` reads it back."""
    float_state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    packed: dict[str, Tensor] = {}
    for name, m in encoder_linears(model).items():
        codes, scale, low = quantize(stored_weight(m), bits, block)
        packed[f"{name}.weight.codes"] = pack_codes(codes, bits)
        packed[f"{name}.weight.shape"] = torch.tensor(codes.shape)
        packed[f"{name}.weight.scale"] = scale
        if low is not None:
            packed[f"{name}.weight.low"] = low
        float_state.pop(f"{name}.weight", None)
    return float_state | packed | {"quant.bits": torch.tensor(bits), "quant.block": torch.tensor(block)}


def unpack_model_(model: nn.Module, packed: dict[str, Tensor]) -> None:
    """Load `pack_model`'s tensors into a plain (not fake-quantized) model: its linear weights become the
    dequantized ones, so it computes what the fake-quantized model computed."""
    bits = int(packed["quant.bits"])
    state = {k: v for k, v in packed.items() if not k.startswith("quant.") and ".weight." not in k}
    for name in encoder_linears(model):
        shape = tuple(packed[f"{name}.weight.shape"].tolist())
        codes = unpack_codes(packed[f"{name}.weight.codes"], bits, shape)
        state[f"{name}.weight"] = dequantize(codes, packed[f"{name}.weight.scale"], packed.get(f"{name}.weight.low"),
                                             bits)
    model.load_state_dict(state)
