"""Joint CTC + LID loss ℓ = ℓ_CTC + γ·ℓ_LID of Lugosch et al. 2022 (docs/architecture.md, "The recipe"; γ = 1 best)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.encoder import ModelOutput


def ctc_lid_loss(
    out: ModelOutput,
    targets: Tensor,
    target_lens: Tensor,
    lang_ids: Tensor,
    lid_weight: float = 1.0,  # γ
) -> tuple[Tensor, dict[str, float]]:
    """CTC (blank 0, summed over the batch / total target tokens) + γ · cross-entropy of the LID logits."""
    log_probs = out.log_probs.float().transpose(0, 1)  # (T', B, V): ctc_loss wants time first
    # Sum over utterances divided by the batch's target tokens: batches are built by duration, so their
    # utterance count varies; per-token normalisation weighs every token alike and keeps the gradient scale
    # independent of how a batch was cut. zero_infinity drops utterances too short for their targets.
    ctc_sum = F.ctc_loss(
        log_probs, targets, out.out_lens, target_lens, blank=0, reduction="sum", zero_infinity=True
    )
    ctc = ctc_sum / target_lens.sum().clamp(min=1)
    lid = F.cross_entropy(out.lid_logits.float(), lang_ids)
    # γ = 0 still multiplies (zero gradient, not a missing one) so DDP sees every parameter used.
    loss = ctc + lid_weight * lid
    with torch.no_grad():
        lid_acc = (out.lid_logits.argmax(dim=-1) == lang_ids).float().mean()
    info = {"loss": loss.item(), "ctc": ctc.item(), "lid": lid.item(), "lid_acc": lid_acc.item()}
    return loss, info
