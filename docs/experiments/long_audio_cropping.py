"""Whole-clip vs crop-and-stitch labeling of long audio, made by joining consecutive unlabeled sl clips.

The experiment behind docs/benchmarks.md, "Cropping warmup on longer audio". Run from the repository root
after `make demo`:

    .venv/bin/python docs/experiments/long_audio_cropping.py runs/demo/finetune/sl/checkpoints/best.pt
"""

from __future__ import annotations

import json
import sys

import jiwer
import torch

sys.path.insert(0, ".")

from pipeline.data.audio import load_audio, log_mel  # noqa: E402
from pipeline.data.text import normalize_text  # noqa: E402
from pipeline.engine.decode import CropSpec, decode_batch  # noqa: E402
from pipeline.engine.model import load_trained  # noqa: E402


def main(checkpoint: str, corpus: str = "data/demo", clips: int = 48) -> None:
    """Print PL CER, empty PLs, chars/s and blank ratio for 1, 4 and 8 joined clips, whole and cropped."""
    trained = load_trained(checkpoint)
    with open(f"{corpus}/manifests/unlabeled.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["language"] == "sl"][:clips]
    with open(f"{corpus}/hidden/unlabeled_reference.jsonl") as f:
        reference = {r["id"]: r["text"] for r in map(json.loads, f)}
    seconds = sum(r["duration_s"] for r in rows)
    for k in (1, 4, 8):  # ≈ 25 s, 100 s, 200 s
        groups = [rows[i : i + k] for i in range(0, len(rows), k)]
        refs, out = [], {"whole": [], "crop": []}
        for group in groups:
            wav = torch.cat([load_audio(r["audio"], trained.audio_policy) for r in group])
            feats = log_mel(wav, trained.features)
            refs.append(normalize_text(" ".join(reference[r["id"]] for r in group)))
            for how, crop in (("whole", None), ("crop", CropSpec(crop_frames=1000, overlap_frames=200))):
                out[how] += decode_batch(trained.model, feats[None], torch.tensor([feats.shape[0]]),
                                         tokenizer=trained.tokenizer, languages=trained.languages, bf16=False,
                                         crop=crop)
        for how, decoded in out.items():
            cer = 100 * jiwer.cer(refs, [normalize_text(d["hypothesis"]) for d in decoded])
            empty = sum(d["num_tokens"] == 0 for d in decoded)
            chars = sum(len(d["hypothesis"]) for d in decoded) / seconds
            blank = sum(d["blank_ratio"] for d in decoded) / len(decoded)
            print(f"{k} clip(s) joined (≈ {seconds / len(groups):.0f} s), {how}: PL CER {cer:.1f} %, "
                  f"empty {empty}/{len(decoded)}, {chars:.2f} chars/s, blank ratio {blank:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
