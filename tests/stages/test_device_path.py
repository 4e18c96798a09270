"""The device path of every stage, on the device `MLPL_TEST_DEVICE` names (default: the CPU). `make gpu-check` runs
this file with `MLPL_TEST_DEVICE=cuda` on a GPU; `make test` runs it on the CPU, so the script's parts are checked
everywhere."""

from __future__ import annotations

import math
import os

import torch

from pipeline.config import finetune_tiny, label_tiny, slimipl_tiny, student_tiny, supervised_tiny
from pipeline.engine.device import precision_used
from pipeline.stages.finetune import run_finetune
from pipeline.stages.label import run_label
from pipeline.stages.slimipl import run_slimipl
from pipeline.stages.student import run_student
from pipeline.stages.supervised import run_supervised
from storage.checkpoint import load_checkpoint
from storage.pl import load_pseudo_labels

DEVICE = os.environ.get("MLPL_TEST_DEVICE", "cpu")
FAST = {"save_every": 2, "log_every": 2, "eval_every": 100}


def _manifests(corpus: str) -> tuple[str, str, str]:
    return (f"{corpus}/manifests/labeled.jsonl", f"{corpus}/manifests/unlabeled.jsonl",
            f"{corpus}/manifests/dev.jsonl")


def _finite(result) -> bool:
    return bool(result.losses) and all(math.isfinite(x) for x in result.losses)


def test_every_training_stage_runs_on_the_device_with_bf16_where_native(smoke_corpus, tmp_path):
    labeled, unlabeled, dev = _manifests(smoke_corpus)
    run = str(tmp_path / "run")
    sup = run_supervised(supervised_tiny(labeled, dev, max_updates=4, device=DEVICE, **FAST), run)
    assert sup.step == 4 and _finite(sup) and sup.precision == precision_used(True, DEVICE)
    ft = run_finetune(finetune_tiny("sl", labeled, dev, max_updates=2, device=DEVICE, **FAST), run)
    sl = run_slimipl(slimipl_tiny("sl", labeled, unlabeled, dev, max_updates=2, cropping_warmup_updates=1,
                                  unlabeled_ratio=1, pl_cache_size=2, device=DEVICE, **FAST), run)
    assert ft.step == 2 and sl.step == 2 and _finite(ft) and _finite(sl)
    labels = str(tmp_path / "labels")
    teachers = {lang: sup.last_checkpoint for lang in ("es", "el", "sl")}
    # Crop-and-stitch: every clip over 5 s is labeled as 2 s crops stitched back together, under bf16 autocast.
    res = run_label(label_tiny(unlabeled, teachers, device=DEVICE, max_whole_s=5.0, crop_s=2.0, crop_overlap_s=0.5,
                               filters={"min_tokens": 0}), labels)
    assert res.units_labeled > 0 and len(load_pseudo_labels(labels)) > 0
    student = run_student(student_tiny("finetune", labeled, dev, max_updates=2, labels_root=labels,
                                       pl_filter={"min_tokens": 0}, init_checkpoint=sup.last_checkpoint,
                                       device=DEVICE, **FAST), run)
    assert student.step == 2 and _finite(student)


def test_a_cpu_run_resumes_on_the_device_and_back(smoke_corpus, tmp_path):
    labeled, _, _ = _manifests(smoke_corpus)
    run = str(tmp_path / "run")
    cfg = supervised_tiny(labeled, None, max_updates=2, device="cpu", **FAST)
    run_supervised(cfg, run)
    on_device = run_supervised(cfg.model_copy(update={"max_updates": 4, "device": DEVICE}), run)
    assert on_device.step == 4 and len(on_device.losses) == 2
    back = run_supervised(cfg.model_copy(update={"max_updates": 6}), run)
    assert back.step == 6 and len(back.losses) == 2 and _finite(back)
    state = load_checkpoint(back.last_checkpoint)  # weights_only: a checkpoint written on any device loads anywhere
    assert all(t.device.type == "cpu" for t in state["model"].values() if isinstance(t, torch.Tensor))


def test_torchrun_trains_on_the_device(smoke_corpus, tmp_path):
    """`torchrun` at world size 1 (2 where two GPUs are, which joins an NCCL process group; one process needs none)."""
    import subprocess
    import sys
    from pathlib import Path

    labeled, _, _ = _manifests(smoke_corpus)
    nproc = 2 if DEVICE.startswith("cuda") and torch.cuda.device_count() >= 2 else 1
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run = tmp_path / "run"
    proc = subprocess.run([torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "flows.cli", "train",
                           "--train", labeled, "--run-dir", str(run), "--max-updates", "2", "--set", f"device={DEVICE}",
                           "--set", "save_every=2", "--set", "eval_every=100"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if nproc > 1:
        assert f"rank 0 of {nproc} joined the process group (cpu:gloo,cuda:nccl)" in proc.stderr
    assert (run / "supervised/checkpoints/last.pt").exists()
