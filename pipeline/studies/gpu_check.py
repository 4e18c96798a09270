"""`make gpu-check`: the CUDA path proven on one GPU and its throughput against the GPU's peak measured in the same
run, written as JSON + Markdown (docs/gpu-check.{json,md}).

Parts, in order (each timed; the whole is sized to finish in minutes on one GPU):
1. the device tests (`tests/stages/test_device_path.py`: a few updates of every training stage, a CPU run resumed on the
   device and back, labeling with crop-and-stitch under bf16 autocast, `torchrun` at world size 1, or 2 with an
   NCCL process group where two GPUs are) run on the device;
2. the matmul peak of the device at the precision labeling uses (bf16 where native, else fp32);
3. labeling-model throughput (forward + greedy CTC, no audio I/O) of the tiny, base and large presets on
   length-sorted batches of 20 s clips, the batch doubled while it fits, as audio-s/s (RTFx) and as a share of
   the peak, each projected to hours labeled per device-day and devices for a million hours in a day;
4. training throughput (the trainer's own `train_step`: CTC + LID loss, backward, clipping, AdamW) of the tiny and
   base presets, as audio-s/s and share.
Without CUDA it says so in one line and runs the CPU parts (the device tests on the CPU, peaks and the tiny
preset's throughput), so the script itself is checked by `make test`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch

from models.encoder import CTCLIDModel
from pipeline.config import model_kwargs
from pipeline.config.base import OptimConfig, base_model, large_model, tiny_model
from pipeline.data.dataset import Batch
from pipeline.engine.device import autocast, cpu_name, gemm_peak_flops, precision_used, synchronize
from pipeline.engine.trainer import make_optimizer, train_step
from storage.files import atomic_write_text, join, write_json

CLIP_S = 20.0  # a typical unlabeled segment (VoxPopuli's are 15-30 s)
FRAMES_PER_S = 100  # 10 ms hop
VOCAB, LANGUAGES, N_MELS = 64, 6, 80


PRESETS = {"tiny": tiny_model, "base": base_model, "large": large_model}
CORPUS_HOURS, WITHIN_HOURS = 1_000_000, 24  # the projection: label a million hours in a day


def _model(preset: str, device: torch.device) -> CTCLIDModel:
    cfg = PRESETS[preset]()
    return CTCLIDModel(**model_kwargs(cfg, VOCAB, LANGUAGES, N_MELS)).to(device)


def flops_per_audio_s(preset: str) -> float:
    """The preset's forward FLOPs per second of audio on 20 s clips (counted on a meta-device model: no memory)."""
    with torch.device("meta"):
        model = _model(preset, torch.device("meta"))
    return model.matmul_flops(int(CLIP_S * FRAMES_PER_S)) / CLIP_S


def projection(rtfx: float, hours: float = CORPUS_HOURS, within_h: float = WITHIN_HOURS) -> dict[str, float]:
    """What a labeling rate (audio-s/s on one device) means at corpus scale: hours labeled per device-day, and
    the devices that label `hours` within `within_h` hours."""
    return {"hours_per_device_day": rtfx * 24, "devices_for_corpus": math.ceil(hours / (rtfx * within_h))}


def _batch(size: int, device: torch.device) -> Batch:
    """`size` random 20 s clips with random transcripts of 12 characters a second (the corpora's rate)."""
    frames, chars = int(CLIP_S * FRAMES_PER_S), int(CLIP_S * 12)
    full = lambda n: torch.full((size,), n, device=device)  # noqa: E731
    return Batch(ids=[str(i) for i in range(size)], feats=torch.randn(size, frames, N_MELS, device=device),
                 feat_lens=full(frames), targets=torch.randint(1, VOCAB, (size, chars), device=device),
                 target_lens=full(chars), lang_ids=torch.randint(0, LANGUAGES, (size,), device=device))


def model_throughput(preset: str, device: torch.device, *, train: bool, max_batch: int, seconds: float,
                     peak: float) -> dict[str, Any]:
    """Audio-s/s of one preset's labeling forward (greedy CTC included) or training step on 20 s clips, at the
    largest batch (doubling from 1, up to `max_batch`) that fits, with its share of `peak`."""
    model = _model(preset, device).train(train)
    flops_per_clip = model.matmul_flops(int(CLIP_S * FRAMES_PER_S)) * (3 if train else 1)  # backward ≈ 2× forward
    optimizer = make_optimizer(OptimConfig(name="adamw", lr=1e-4), model) if train else None
    best: dict[str, Any] | None = None
    size = 1
    while size <= max_batch:
        try:
            rate = _rate(model, optimizer, size, device, seconds)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if best is None or rate > best["audio_s_per_s"]:
            best = {"batch": size, "audio_s_per_s": rate}
        size *= 2
    assert best is not None, f"{preset}: not even one 20 s clip fits"
    flops = best["audio_s_per_s"] / CLIP_S * flops_per_clip
    return best | {"preset": preset, "train": train, "parameters": sum(p.numel() for p in model.parameters()),
                   "tflops": flops / 1e12, "share_of_peak": flops / peak, "rtfx": best["audio_s_per_s"]}


def _rate(model: CTCLIDModel, optimizer, size: int, device: torch.device, seconds: float) -> float:
    batch = _batch(size, device)

    def step() -> None:
        if optimizer is None:
            with autocast(True, device), torch.inference_mode():
                model(batch.feats, batch.feat_lens).log_probs.argmax(-1).cpu()  # greedy CTC: labels leave the device
        else:  # the trainer's own update: CTC + LID loss, backward, clipping, step
            train_step(model, optimizer, batch, lid_weight=0.1, grad_clip_norm=1.0, bf16=True)

    step()  # warm-up (kernels chosen, memory allocated)
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        step()
        n += 1
    synchronize(device)
    return n * size * CLIP_S / (time.perf_counter() - t0)


DEVICE_TESTS = "tests/stages/test_device_path.py"


def run_device_tests(device: str) -> dict[str, Any]:
    """`tests/stages/test_device_path.py` on the device (and `torchrun` at world size 1 where CUDA is), in a child
    pytest."""
    env = os.environ | {"MLPL_TEST_DEVICE": device}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", DEVICE_TESTS],
                          env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    return {"device": device, "passed": proc.returncode == 0, "summary": tail,
            "wall_s": round(time.perf_counter() - t0, 1)}


def run_gpu_check(out_dir: str, *, tests: bool = True, seconds: float = 3.0) -> dict[str, Any]:
    """Every part of the check on this machine; writes `<out_dir>/gpu-check.{json,md}` and returns the record."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = precision_used(True, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    record: dict[str, Any] = {
        "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
        "python": platform.python_version(), "precision": precision,
        "threads": None if cuda else torch.get_num_threads(),
    }
    if not cuda:
        print("no CUDA device here: the GPU parts are skipped; running the CPU parts (device tests on the CPU, "
              "peak, tiny preset throughput)")
    t0 = time.perf_counter()
    record["device_tests"] = run_device_tests(device.type) if tests else None
    peak = gemm_peak_flops(dtype, 8192 if cuda else 1536, device=device)
    record["peak_tflops"] = peak / 1e12
    labeled = ("tiny", "base", "large") if cuda else ("tiny",)
    record["labeling"] = [model_throughput(p, device, train=False, max_batch=256 if cuda else 8, seconds=seconds,
                                           peak=peak) for p in labeled]
    record["training"] = [model_throughput(p, device, train=True, max_batch=64 if cuda else 4, seconds=seconds,
                                           peak=peak) for p in labeled[:2]]
    for m in record["labeling"]:
        m["projection"] = projection(m["rtfx"])
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(join(out_dir, "gpu-check.json"), record)
    atomic_write_text(join(out_dir, "gpu-check.md"), gpu_check_markdown(record))
    return record


def gpu_check_markdown(r: dict[str, Any]) -> str:
    """The check as Markdown: device, tests, peak, and the throughput tables."""
    tests = r["device_tests"]
    lines = [f"### `make gpu-check` on {r['device']} ({'CUDA' if r['cuda'] else 'no CUDA: CPU parts only'})", "",
             f"torch {r['torch']}, Python {r['python']}, precision {r['precision']}"
             + (f", {r['threads']} CPU threads" if r["threads"] else f", {r['gpus']} GPU(s)") + f"; {r['wall_s']} s.",
             "", f"Device tests ({tests['device']}): {'passed' if tests['passed'] else 'FAILED'} — {tests['summary']}"
             if tests else "Device tests: not run.", "",
             f"Matmul peak ({r['precision']}): {r['peak_tflops']:.2f} TFLOP/s", "",
             "| what | preset | parameters | batch (20 s clips) | audio-s/s (RTFx) | TFLOP/s | share of peak |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for kind in ("labeling", "training"):
        for m in r[kind]:
            lines.append(f"| {kind} | {m['preset']} | {m['parameters'] / 1e6:.1f} M | {m['batch']} | "
                         f"{m['audio_s_per_s']:.0f} | {m['tflops']:.3f} | {100 * m['share_of_peak']:.0f} % |")
    unit = "GPU" if r["cuda"] else "machine"
    lines += ["", f"Projection from the labeling rates above (model only: audio decoding runs beside it on CPU "
              f"workers): {CORPUS_HOURS:,} h within {WITHIN_HOURS} h.", "",
              f"| preset | hours labeled per {unit}-day | {unit}s for {CORPUS_HOURS:,} h in {WITHIN_HOURS} h |",
              "|---|---:|---:|"]
    for m in r["labeling"]:
        p = m["projection"]
        lines.append(f"| {m['preset']} | {p['hours_per_device_day']:,.0f} | {p['devices_for_corpus']:,} |")
    if not r["cuda"]:
        lines += ["", "No GPU here: the GPU figures are still to be measured (`make gpu-check` on a CUDA machine)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pipeline.studies.gpu_check [OUT_DIR] [--skip-tests] [--seconds S]` (what
    `make gpu-check` runs); exit status 1 when the device tests fail."""
    import argparse

    p = argparse.ArgumentParser(prog="gpu-check")
    p.add_argument("out", nargs="?", default="docs")
    p.add_argument("--skip-tests", action="store_true", help="only the peak and throughput parts")
    p.add_argument("--seconds", type=float, default=3.0, help="timing window of each throughput figure")
    args = p.parse_args(argv)
    record = run_gpu_check(args.out, tests=not args.skip_tests, seconds=args.seconds)
    print(gpu_check_markdown(record))
    print(json.dumps({"device_tests_passed": (record["device_tests"] or {}).get("passed")}))
    return 0 if (record["device_tests"] or {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
