"""Data-parallel training under torchrun: two gloo ranks on CPU (pipeline/engine/{distributed,trainer}.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import supervised_tiny
from pipeline.data.samplers import batch_sampler
from pipeline.data.stream import LazyBatchLoader, load_unlabeled
from pipeline.data.world import World
from pipeline.engine.distributed import shard
from pipeline.stages.supervised import prepare_data

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
UPDATES, SAVE_EVERY, KILL_AT = 8, 2, 5


def test_shard_hands_each_rank_every_size_th_batch_and_keeps_the_global_position():
    durations = [1.0 + (i % 7) * 0.5 for i in range(60)]
    make = lambda: batch_sampler(durations, supervised_tiny("x.jsonl", None).batch, seed=3)  # noqa: E731
    ranks = [make() for _ in range(2)]
    streams = [shard(s, World(r, 2)) for r, s in enumerate(ranks)]
    epoch = make().epoch_batches(0)
    got = [next(streams[k % 2]) for k in range(len(epoch) // 2 * 2)]
    assert got == epoch[: len(got)]  # rank 0 takes batches 0, 2, …; rank 1 takes 1, 3, …
    assert ranks[0].state_dict() == ranks[1].state_dict()  # both samplers stand at the global position
    assert list(shard(range(5), World(1, 2))) == [1, 3] and list(shard(range(5), World(0, 2))) == [0, 2, 4]


def test_the_unlabeled_stream_is_split_between_ranks_without_overlap(smoke_corpus):
    cfg = supervised_tiny("x.jsonl", None)
    utts, _ = load_unlabeled(f"{smoke_corpus}/manifests/unlabeled.jsonl", features=cfg.features, policy=cfg.audio)
    loaders = [LazyBatchLoader(utts, features=cfg.features, policy=cfg.audio, max_batch_duration_s=60,
                               max_batch_size=4, num_buckets=2, seed=1, world=World(r, 2)) for r in range(2)]
    one_epoch = [[utts[i].id for i in b] for b in loaders[0].sampler.epoch_batches(0)]
    seen = []
    for r, loader in enumerate(loaders):
        positions = loader._positions(loader.state_dict(), 1, loader.world)
        seen.append([[utts[i].id for i in idx] for _, idx in positions])
        assert seen[r] == one_epoch[r::2]
    ids = [i for rank in seen for b in rank for i in b]
    assert sorted(ids) == sorted(i for b in one_epoch for i in b) and len(ids) == len(set(ids))


def _torchrun(args: list[str], trace: Path, *, nproc: int = 2, kill_at: int = 0) -> subprocess.CompletedProcess:
    trace.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"MLPL_TRACE_DIR": str(trace), "MLPL_KILL_AT_UPDATE": str(kill_at), "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "helpers" / "dist_worker.py")
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", worker, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _trace(trace: Path, rank: int) -> list[dict]:
    path = trace / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train_args(smoke_corpus: str, run_dir: Path, updates: int = UPDATES) -> list[str]:
    return ["train", "--train", f"{smoke_corpus}/manifests/labeled.jsonl", "--run-dir", str(run_dir),
            "--max-updates", str(updates), "--threads", "1", "--set", f"save_every={SAVE_EVERY}",
            "--set", "log_every=4"]


@pytest.mark.slow
def test_two_gloo_ranks_split_the_batches_agree_on_weights_write_once_and_resume_after_a_kill(smoke_corpus, tmp_path):
    # 1. An uninterrupted 2-rank run.
    run = _torchrun(_train_args(smoke_corpus, tmp_path / "straight"), tmp_path / "trace-straight")
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [[r for r in _trace(tmp_path / "trace-straight", k) if r["kind"] == "update"] for k in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(1, UPDATES + 1))

    # Rank r trained on global batches r, r + 2, … of the one sampler a single process would draw from.
    cfg = supervised_tiny(f"{smoke_corpus}/manifests/labeled.jsonl", None)
    train, *_ = prepare_data(cfg)
    sampler = batch_sampler(train.durations(), cfg.batch, cfg.seed)
    global_batches = [sorted(train.utterances[i].id for i in next(iter_)) for iter_ in [iter(sampler)]
                      for _ in range(2 * UPDATES)]
    for k in range(UPDATES):
        assert ranks[0][k]["ids"] == global_batches[2 * k] and ranks[1][k]["ids"] == global_batches[2 * k + 1]
        assert not set(ranks[0][k]["ids"]) & set(ranks[1][k]["ids"])
    epoch = len(sampler.epoch_batches(0))
    assert epoch <= 2 * UPDATES, "the run must cover at least one whole epoch"
    first_epoch = [i for b in global_batches[:epoch] for i in b]
    assert sorted(first_epoch) == sorted(u.id for u in train.utterances)  # the ranks together cover the epoch

    # Gradients are averaged: both replicas hold the same weights after every update, and they change.
    assert [r["weights"] for r in ranks[0]] == [r["weights"] for r in ranks[1]]
    assert len({r["weights"] for r in ranks[0]}) == UPDATES
    assert ranks[0][0]["loss"] == ranks[1][0]["loss"]  # the logged loss is the mean over the ranks

    # Rank 0 alone writes; last.pt records the world size and each rank's own state.
    writes = [_trace(tmp_path / "trace-straight", k) for k in (0, 1)]
    assert [w for w in writes[1] if w["kind"] == "write"] == []
    written = " ".join(w["path"] for w in writes[0] if w["kind"] == "write")
    for name in ("last.pt", "best.pt", "metrics.jsonl", "result.json", "config.json"):
        assert name in written, name
    last = torch.load(tmp_path / "straight/supervised/checkpoints/last.pt", weights_only=True)
    assert last["world_size"] == 2 and len(last["rank_states"]) == 2 and last["step"] == UPDATES
    assert last["rank_states"][0]["stage_state"]["sampler"] == last["rank_states"][1]["stage_state"]["sampler"]

    # 2. The same run, rank 0 SIGKILLed right after update 5 (last.pt holds update 4): torchrun ends both ranks.
    killed = _torchrun(_train_args(smoke_corpus, tmp_path / "killed"), tmp_path / "trace-killed", kill_at=KILL_AT)
    assert killed.returncode != 0
    assert torch.load(tmp_path / "killed/supervised/checkpoints/last.pt", weights_only=True)["step"] == 4

    # One process cannot continue a 2-rank run: it is told how to.
    mlpl = str(Path(sys.executable).with_name("mlpl"))
    alone = subprocess.run([mlpl, *_train_args(smoke_corpus, tmp_path / "killed")], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert alone.returncode == 2, alone.stderr[-2000:]
    assert "trained by 2 process(es)" in alone.stderr and "--nproc-per-node 2" in alone.stderr

    # Two ranks resume from update 4 and end where the uninterrupted run ended, bit for bit.
    resumed = _torchrun(_train_args(smoke_corpus, tmp_path / "killed"), tmp_path / "trace-resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = [[r for r in _trace(tmp_path / "trace-resumed", k) if r["kind"] == "update"] for k in (0, 1)]
    assert [r["step"] for r in again[0]] == list(range(5, UPDATES + 1))
    assert [r["ids"] for r in again[1]] == [r["ids"] for r in ranks[1][4:]]
    assert again[0][-1]["weights"] == again[1][-1]["weights"] == ranks[0][-1]["weights"]
    history = [json.loads(x) for x in (tmp_path / "killed/supervised/metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (tmp_path / "straight/supervised/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, UPDATES + 1))  # each update once
    assert [h["loss"] for h in history] == [h["loss"] for h in straight]


@pytest.mark.slow
def test_fine_tune_slimipl_and_student_run_under_two_ranks(smoke_corpus, teacher, labeled_root, tmp_path):
    m, run = Path(smoke_corpus) / "manifests", tmp_path / "run"
    common = ["--train", str(m / "labeled.jsonl"), "--run-dir", str(run), "--max-updates", "6", "--threads", "1",
              "--set", "optim.warmup_updates=1", "--set", "save_every=3"]
    lenient = ["collapse.max_empty_share=1", "collapse.max_blank_ratio=1", "collapse.min_chars_per_s=0",
               "pl_cache_size=2", "unlabeled_ratio=1", "cropping_warmup_updates=2", "pl_eval_max_utterances=2"]
    stages = {
        "finetune/sl": ["finetune", "--language", "sl", "--init", teacher, "--dev", str(m / "dev.jsonl"),
                        "--set", "eval_every=3"],
        "slimipl/sl": ["slimipl", "--language", "sl", "--unlabeled", str(m / "unlabeled.jsonl"), "--reference",
                       str(Path(smoke_corpus) / "hidden/unlabeled_reference.jsonl"),
                       *[x for kv in lenient for x in ("--set", kv)]],
        "student/finetune": ["student", "--mode", "finetune", "--init", teacher, "--labels", labeled_root],
    }
    for stage, args in stages.items():
        trace = tmp_path / f"trace-{stage.replace('/', '-')}"
        done = _torchrun([*args, *common], trace)
        assert done.returncode == 0, (stage, done.stderr[-3000:])
        ranks = [[r for r in _trace(trace, k) if r["kind"] == "update"] for k in (0, 1)]
        assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(1, 7)), stage
        assert [r["weights"] for r in ranks[0]] == [r["weights"] for r in ranks[1]], stage
        assert all(not set(a["ids"]) & set(b["ids"]) for a, b in zip(*ranks, strict=True)), stage
        assert not [w for w in _trace(trace, 1) if w["kind"] == "write"], stage
        result = json.loads((run / stage / "result.json").read_text())
        assert result["step"] == 6 and not result["cached"], stage
    slim = json.loads((run / "slimipl/sl/result.json").read_text())["extra"]
    assert slim["pl_updates"] > 0 and slim["refreshes"] >= 2 and "end" in slim["pl_eval"]
    student = json.loads((run / "student/finetune/result.json").read_text())["extra"]
    assert student["updates_by_source"]["pl"] > 0 and student["updates_by_source"]["labeled"] > 0
