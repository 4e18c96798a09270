"""`make faults`: faults an operator meets, injected on purpose through the real components, each trial run
several times at random points, then a clean rerun compared with an uninterrupted reference run.

Each trial returns one row of the table: how many faults landed, whether the run recovered (every check held),
rows lost and duplicated against the reference, samples differing (PL rows, shard members and model tensors that
are not equal, timestamps aside) and the clean rerun's wall time. The checks after every fault: a one-line error
naming the file or the cause, no temp file left and every file under a final name whole (Parquet readable, tar
complete, JSON parseable).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RelabelConfig, label_tiny, supervised_tiny
from pipeline.layout import split_manifest
from pipeline.stages.label import run_label
from storage.checkpoint import load_checkpoint
from storage.faults import FULL_DISK_PROTOCOL, FullDiskFileSystem, partial_files
from storage.pl import load_pseudo_labels, load_rejects

# Columns and shard fields that hold when a row was written, not what it says.
_TIMESTAMPS = ("created_at",)


@dataclass
class TrialResult:
    """One row of the fault table."""

    fault: str
    trials: int = 0  # faults that landed while the component was working
    recovered: bool = True  # every check after every fault held, and the clean rerun equals the reference
    rows_lost: int = 0
    rows_duplicated: int = 0
    differing: int = 0  # PL rows, shard members or checkpoint tensors unequal to the reference (timestamps aside)
    recover_s: float | None = None  # wall time of the clean rerun (None: the trial has none)
    problems: list[str] = field(default_factory=list)  # what did not hold, one line each
    note: str = ""

    def fail(self, problem: str) -> None:
        """Record a check that did not hold."""
        self.recovered = False
        self.problems.append(problem)


# --- comparing outputs ---------------------------------------------------------------------------------------


def _shard_samples(folder: Path, ignore: tuple[str, ...]) -> dict[str, bytes]:
    """Every sample of a labels root's shards by row id: its FLAC bytes and its JSON without `ignore`d fields."""
    out = {}
    for shard in sorted(folder.glob("shards/*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            meta = json.loads(parts.get("json", b"{}"))
            kept = json.dumps({k: v for k, v in meta.items() if k not in ignore}, sort_keys=True).encode()
            out[str(meta.get("id"))] = parts.get("flac", b"") + kept
    return out


def compare_labels(reference: str, root: str, same_units: bool = True, same_teachers: bool = True) -> dict[str, int]:
    """Rows lost and duplicated, and PL rows plus shard samples that differ, of a labels root against the
    reference (local folders), timestamps aside; `same_units=False` (a relabel that split its work differently)
    also sets aside which shard and unit a row is in, `same_teachers=False` (teachers trained again) the
    `teacher` column: a checkpoint's sha256 covers the wall times it records (the weights are compared apart)."""
    ignore = _TIMESTAMPS + (() if same_units else ("shard", "key")) + (() if same_teachers else ("teacher",))
    want, got = load_pseudo_labels(reference), load_pseudo_labels(root)
    lost = len(set(want["id"]) - set(got["id"]))
    duplicated = len(got) - got["id"].nunique()
    columns = [c for c in want.columns if c not in ignore]
    w = want[columns].set_index("id").sort_index()
    g = got[columns].drop_duplicates("id").set_index("id").reindex(w.index)
    differing = int((~(w.eq(g) | (w.isna() & g.isna())).all(axis=1)).sum())
    theirs, ours = _shard_samples(Path(reference), ignore), _shard_samples(Path(root), ignore)
    differing += sum(ours.get(i) != data for i, data in theirs.items())
    lost_rejects = len(set(load_rejects(reference)["id"]) - set(load_rejects(root)["id"]))
    return {"rows_lost": lost + lost_rejects, "rows_duplicated": duplicated, "differing": differing}


def _fault_message_ok(message: str, must: tuple[str, ...]) -> bool:
    return "\n" not in message.strip() and all(m in message for m in must)


def _fault_point(spans: list[tuple[str, int, int]], rng: random.Random) -> int:
    """A byte budget that ends inside a file drawn uniformly from those a whole run writes (shards are most of
    the bytes; drawing by file hits tables, catalog records and checkpoints as often)."""
    _, start, size = rng.choice(spans)
    return start + rng.randrange(max(1, size))


def _kind(message: str) -> str:
    """What sort of file a disk-full message names."""
    found = re.search(r"writing (\S+?)[,:] ", message)
    suffix = Path(found.group(1)).suffix if found else ""
    return {".tar": "shard", ".parquet": "table", ".json": "catalog/JSON", ".jsonl": "rejects",
            ".pt": "checkpoint"}.get(suffix, suffix or "other")


# --- trial: disk full while labeling -----------------------------------------------------------------------------


def disk_full_labeling(corpus_dir: str, teacher: str, work: Path, reference: str, trials: int,
                       rng: random.Random) -> TrialResult:
    """ENOSPC inside a random file of labeling's writes (shards, PL and reject tables, catalog), `trials` times, each
    on its own labels root, then a clean rerun there compared with the reference."""
    result = TrialResult("disk full (ENOSPC) while labeling: shard, table or catalog write")
    cfg = label_tiny(split_manifest(corpus_dir, "unlabeled"), _teachers(teacher), unit_max_utterances=2)
    FullDiskFileSystem.set_budget(None)
    run_label(cfg, f"{FULL_DISK_PROTOCOL}://{work / 'probe'}")
    total, spans = FullDiskFileSystem.written_bytes, FullDiskFileSystem.file_spans()  # what a whole run writes
    hit: Counter = Counter()
    recover = []
    for i in range(trials):
        root = work / f"labels-{i}"
        if not _out_of_space(result, hit, _fault_point(spans, rng),
                             partial(run_label, cfg, f"{FULL_DISK_PROTOCOL}://{root}"), root):
            result.fail("a budget below a whole run's bytes did not stop it")
        _clean_rerun(result, lambda root=root: run_label(cfg, str(root)))
        recover.append(result.recover_s)
        _add_comparison(result, compare_labels(reference, str(root)))
    result.recover_s = sum(recover) / len(recover) if recover else None
    result.note = (f"fulldisk:// (a local folder with a byte budget; a whole run writes {total / 1e6:.1f} MB in "
                   f"{len(spans)} files); hit: {_hits(hit)}")
    return result


def _out_of_space(result: TrialResult, hit: Counter, budget: int, run: Callable[[], Any], folder: Path) -> bool:
    """`run` with this process's writes limited to `budget` bytes: whether the full disk stopped it (then its
    error counted by the kind of file and checked to be one line naming the file and the fix), and the folder
    checked for anything half-written."""
    FullDiskFileSystem.set_budget(budget)
    try:
        run()
        landed = False
    except OSError as err:
        landed = True
        result.trials += 1
        hit[_kind(str(err))] += 1
        if not _fault_message_ok(str(err), ("no space left writing", "rerun")):
            result.fail(f"unclear error: {err}")
    finally:
        FullDiskFileSystem.set_budget(None)
    for problem in partial_files(str(folder)):
        result.fail(problem)
    return landed


def _hits(hit: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(hit.items()))


def _teachers(teacher: str) -> dict[str, str]:
    from pipeline.engine.model import load_trained

    return {lang: teacher for lang in load_trained(teacher).languages}


def _clean_rerun(result: TrialResult, rerun: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        rerun()
    except Exception as err:  # the trial reports it; the harness goes on with the next trial
        result.fail(f"clean rerun failed: {type(err).__name__}: {err}")
    result.recover_s = time.perf_counter() - t0


def _add_comparison(result: TrialResult, found: dict[str, int]) -> None:
    """Add one comparison with the reference to the trial's counts."""
    result.rows_lost += found.get("rows_lost", 0)
    result.rows_duplicated += found.get("rows_duplicated", 0)
    result.differing += found.get("differing", 0)
    if any(found.values()):
        result.fail(f"differs from the reference: {found}")


# --- trial: disk full while training saves checkpoints -------------------------------------------------------------


def disk_full_checkpoints(corpus_dir: str, work: Path, trials: int, rng: random.Random,
                          updates: int = 24, save_every: int = 6) -> TrialResult:
    """ENOSPC inside a random file of a training run's writes (its checkpoints, best, metrics), `trials` times on one
    run folder, then a clean rerun to the end; the final weights compared with an uninterrupted run's."""
    from pipeline.stages.supervised import run_supervised

    result = TrialResult("disk full (ENOSPC) while training saves a checkpoint")
    cfg = supervised_tiny(split_manifest(corpus_dir, "labeled"), None, max_updates=updates, save_every=save_every,
                          eval_every=updates)
    FullDiskFileSystem.set_budget(None)
    reference = run_supervised(cfg, f"{FULL_DISK_PROTOCOL}://{work / 'reference'}")
    total, spans = FullDiskFileSystem.written_bytes, FullDiskFileSystem.file_spans()
    run = work / "run"
    hit: Counter = Counter()
    for _ in range(trials):
        landed = _out_of_space(result, hit, _fault_point(spans, rng),
                               partial(run_supervised, cfg, f"{FULL_DISK_PROTOCOL}://{run}"), run)
        last = run / "supervised/checkpoints/last.pt"
        if landed and last.exists():
            load_checkpoint(str(last))  # a checkpoint under its name loads (weights_only)
    _clean_rerun(result, lambda: run_supervised(cfg, str(run)))
    want = load_checkpoint(reference.last_checkpoint.replace(f"{FULL_DISK_PROTOCOL}://", ""))["model"]
    got = load_checkpoint(str(run / "supervised/checkpoints/last.pt"))["model"]
    result.differing = sum(not torch.equal(want[k], got[k]) for k in want)
    if result.differing:
        result.fail(f"{result.differing} of {len(want)} tensors differ from the uninterrupted run's")
    result.note = (f"{updates} updates, a checkpoint every {save_every}; a whole run writes {total / 1e6:.1f} MB in "
                   f"{len(spans)} files; hit: {_hits(hit)}")
    return result


# --- trial: a relabel SIGKILLed while it holds its lock ----------------------------------------------------------

_RELABEL_CHILD = """
import sys
from pipeline.config import RelabelConfig
from pipeline.stages.relabel import run_relabel
run_relabel(RelabelConfig.model_validate_json(sys.argv[1]))
"""


def _watch_folder(corpus_dir: str, watch: Path) -> None:
    for flac in sorted(Path(corpus_dir, "audio", "unlabeled").rglob("*.flac")):
        target = watch / flac.parent.name / flac.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(flac, target)


def relabel_killed_holding_its_lock(corpus_dir: str, teacher: str, work: Path, trials: int,
                                    rng: random.Random) -> TrialResult:
    """SIGKILL `mlpl relabel` at random points while it holds the labels root's lock, `trials` times; the next
    run takes the lock over (its holder is dead), labels what was left and duplicates nothing."""
    result = TrialResult("relabel SIGKILLed while holding its lock")
    watch = work / "watch"
    _watch_folder(corpus_dir, watch)
    teachers = _teachers(teacher)

    def cfg(root: Path) -> RelabelConfig:
        return RelabelConfig(watch=str(watch), labels_root=str(root), teachers=teachers, preset="tiny",
                             label={"unit_max_utterances": 2}, lock_wait_s=60, unknown_language="reject")

    from pipeline.stages.relabel import run_relabel
    from storage.pl import LabelStore

    run_relabel(cfg(work / "reference"))
    root = work / "labels"
    lock = Path(LabelStore(str(root)).relabel_lock_url)
    args = [sys.executable, "-c", _RELABEL_CHILD, cfg(root).model_dump_json()]
    for _ in range(trials):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 4.0))
        if proc.poll() is None and lock.exists():
            os.kill(proc.pid, signal.SIGKILL)
            result.trials += 1
        proc.wait()
        for problem in partial_files(str(root), temp_ok=True):
            result.fail(problem)
    _clean_rerun(result, lambda: run_relabel(cfg(root)))
    for problem in partial_files(str(root)):
        result.fail(problem)
    _add_comparison(result, compare_labels(str(work / "reference"), str(root), same_units=False))
    result.note = "a lock whose holder is dead on this host is broken at once; another host's after lock_stale_s"
    return result


# --- trial: a shard truncated or a table file corrupted before the student reads it ------------------------------


def _student_config(corpus_dir: str, teacher: str, labels: str):
    """A short fine-tuned student over every PL row (PL-heavy batches of 2, one shard per window), so a few
    updates read every shard."""
    from pipeline.config import student_tiny

    return student_tiny("finetune", split_manifest(corpus_dir, "labeled"), None, init_checkpoint=teacher,
                        labels_root=labels, max_updates=16, eval_every=16, save_every=16, pl_window_shards=1,
                        source_weights={"labeled": 1.0, "pl": 3.0},
                        pl_batch={"max_batch_duration_s": 60.0, "max_batch_size": 2, "num_buckets": 2})


def _complete_samples(shard: Path) -> set[str]:
    """Keys whose FLAC member reads whole from a (maybe truncated) tar, as a streaming reader gets them."""
    keys = set()
    try:
        with tarfile.open(shard, mode="r|") as tar:
            for m in tar:
                if m.name.endswith(".flac") and len(tar.extractfile(m).read()) == m.size:
                    keys.add(m.name.rsplit(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError):
        pass  # what was read before the cut is all there is
    return keys


def truncated_shard(corpus_dir: str, teacher: str, work: Path, reference: str, trials: int,
                    rng: random.Random) -> TrialResult:
    """A PL shard cut at a random byte before the student reads it, `trials` times: each sample the cut destroys
    is a reject naming the shard, every other one is read; nothing is dropped silently."""
    from pipeline.stages.student import run_student

    result = TrialResult("PL shard truncated before the student reads it")
    table = load_pseudo_labels(reference)
    for i in range(trials):
        labels = work / f"labels-{i}"
        shutil.copytree(reference, labels)
        shard = rng.choice(sorted(labels.glob("shards/*.tar")))
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.truncate(rng.randrange(512, size))
        kept = _complete_samples(shard)
        in_shard = table[table["shard"] == f"shards/{shard.name}"]
        lost = {i for i, k in zip(in_shard["id"], in_shard["key"], strict=True) if k not in kept}
        try:
            run_student(_student_config(corpus_dir, teacher, str(labels)), str(work / f"run-{i}"))
        except Exception as err:  # the trial reports it
            result.fail(f"student failed: {type(err).__name__}: {err}")
            continue
        result.trials += 1
        rejects = _jsonl(work / f"run-{i}" / "student" / "finetune" / "rejects.jsonl")
        named = {r["id"] for r in rejects if shard.name in r["reason"]}
        if named != lost:
            result.fail(f"rejects naming {shard.name}: {sorted(named)}; samples the cut destroyed: {sorted(lost)}")
        result.rows_lost += len(lost - named)
    result.note = ("the student skips each destroyed sample with a reject row naming the shard (the rest of a PL "
                   "corpus is still worth training on); the table says which rows")
    return result


def corrupt_table_file(corpus_dir: str, teacher: str, work: Path, reference: str, rng: random.Random) -> TrialResult:
    """One PL table file overwritten with garbage: the student fails at once with a message naming the file; with
    the file restored it trains."""
    from pipeline.stages.student import run_student

    result = TrialResult("PL table file corrupted before the student reads it")
    labels = work / "labels"
    shutil.copytree(reference, labels)
    part = rng.choice(sorted(labels.glob("pl/*/*.parquet")))
    original = part.read_bytes()
    part.write_bytes(rng.randbytes(len(original)))
    cfg = _student_config(corpus_dir, teacher, str(labels))
    try:
        run_student(cfg, str(work / "run"))
        result.fail("the student trained on a corrupted table without an error")
    except Exception as err:  # any error type: what matters is that it names the file
        result.trials += 1
        if str(part.relative_to(labels)) not in str(err) and part.name not in str(err):
            result.fail(f"the error does not name {part}: {type(err).__name__}: {err}")
        result.note = (f"fails at once, naming the file: {type(err).__name__} on {part.relative_to(labels)}; "
                       "with the file restored the rerun trains")
    part.write_bytes(original)
    _clean_rerun(result, lambda: run_student(cfg, str(work / "run")))
    return result


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- trial: two recipes started on one run folder --------------------------------------------------------------


def _recipe_form(corpus_dir: str, run_dir: Path) -> dict[str, Any]:
    """A recipe of a few updates per stage on the corpus: one fine-tuned student, no serving stages."""
    quick = {"max_updates": 6, "eval_every": 6, "save_every": 3, "log_every": 3,
             "optim": {"name": "adamw", "lr": 1e-3, "warmup_updates": 1, "schedule": "constant"}}
    slim = quick | {"pl_cache_size": 2, "unlabeled_ratio": 1, "cropping_warmup_updates": 2,
                    "collapse": {"max_empty_share": 1.0, "max_blank_ratio": 1.0, "min_chars_per_s": 0.0},
                    "pl_eval_max_utterances": 2}
    manifests = {f"{split}_manifest": split_manifest(corpus_dir, split) for split in ("labeled", "dev", "unlabeled",
                                                                                      "test")}
    return manifests | {"run_dir": str(run_dir), "preset": "tiny",
            "supervised": {"max_updates": 12, "eval_every": 12, "save_every": 6}, "finetune": quick, "slimipl": slim,
            "student": quick, "student_modes": ["finetune"], "student_labeled_finetune": False,
            "labeling_filter": {"min_tokens": 0}, "student_pl_filter": {"min_tokens": 0}}


def reference_recipe(corpus_dir: str, work: Path) -> Path:
    """The trials' recipe run once, uninterrupted, into `<work>/reference-recipe` (once per harness run)."""
    run = work / "reference-recipe" / "run"
    if not (run / "report" / "report.json").exists():
        form = work / "reference-recipe" / "recipe.json"
        form.parent.mkdir(parents=True, exist_ok=True)
        form.write_text(json.dumps(_recipe_form(corpus_dir, run)))
        subprocess.run([sys.executable, "-m", "flows.cli", "recipe", "--config", str(form)], check=True,
                       capture_output=True, timeout=900)
    return run


def compare_recipe_runs(reference: Path, run: Path) -> dict[str, int]:
    """A recipe run folder against the reference's: its PL corpus (`compare_labels`, teachers by their weights)
    and the weights of every stage's last checkpoint (tensors not equal count as differing; a checkpoint
    missing, as a row lost)."""
    found = compare_labels(str(reference / "labels"), str(run / "labels"), same_teachers=False)
    for ckpt in sorted(reference.rglob("checkpoints/last.pt")):
        mine = run / ckpt.relative_to(reference)
        if not mine.exists():
            found["rows_lost"] += 1
            continue
        want, got = load_checkpoint(str(ckpt))["model"], load_checkpoint(str(mine))["model"]
        found["differing"] += sum(not torch.equal(want[k], got[k]) for k in want)
    return found


def two_recipes_on_one_run_folder(corpus_dir: str, work: Path, trials: int, rng: random.Random) -> TrialResult:
    """A second `mlpl recipe` on a run folder where one is running, `trials` times at random points of the first:
    it is refused at once with who holds the folder; the first is then SIGKILLed there, and a rerun takes the
    folder over (its holder is dead), resumes and finishes."""
    result = TrialResult("two recipes started on one run folder")
    run = work / "run"
    form = work / "recipe.json"
    form.write_text(json.dumps(_recipe_form(corpus_dir, run)))
    args = [sys.executable, "-m", "flows.cli", "recipe", "--config", str(form)]
    lock = run / "recipe.lock"
    refusal = ""
    for _ in range(trials):
        first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 20.0))
        if first.poll() is not None:
            continue  # it finished before the second came
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
        result.trials += 1
        message = next((line for line in second.stderr.splitlines() if line.startswith("mlpl: error:")), "")
        if second.returncode == 0 or not _fault_message_ok(message, ("another recipe is running", str(run))):
            result.fail(f"second recipe: exit {second.returncode}, said {message!r}")
        refusal = refusal or message
        os.killpg(first.pid, signal.SIGKILL)  # the first dies holding the folder's lock
        first.wait()
        for problem in partial_files(str(run), temp_ok=True):
            result.fail(problem)
    _clean_rerun(result, lambda: subprocess.run(args, check=True, capture_output=True, timeout=900))
    for problem in partial_files(str(run)):
        result.fail(problem)
    if not Path(run, "report", "report.json").exists():
        result.fail("the rerun did not finish the recipe (no report/report.json)")
    _add_comparison(result, compare_recipe_runs(reference_recipe(corpus_dir, work.parent), run))
    result.note = ("the second is refused at once (`run_dir_wait_s` makes it wait); a holder that died is taken "
                   f"over by the next run, which resumes. The refusal: `{refusal}`")
    return result


# --- trial: the Prefect server killed and restarted mid-recipe ------------------------------------------------


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_prefect_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` with its database under `home`; returns once it answers."""
    import urllib.request

    env = os.environ | _prefect_env(home, port)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"prefect server did not start (log: {log})") from None
            time.sleep(0.5)


def _prefect_env(home: Path, port: int) -> dict[str, str]:
    api = f"http://127.0.0.1:{port}/api"
    return {"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _recipe_run_states(home: Path, port: int) -> list[str]:
    """The states of the server's mlpl-recipe flow runs, oldest first (what the UI lists)."""
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = [r for r in c.read_flow_runs() if r.name and c.read_flow(r.flow_id).name == 'mlpl-recipe']\n"
            "    print(json.dumps([r.state_name for r in sorted(runs, key=lambda r: r.created)]))")
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | _prefect_env(home, port),
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else [f"unreadable: {out.stderr}"]


def prefect_server_restarted(corpus_dir: str, work: Path, trials: int, rng: random.Random) -> TrialResult:
    """The Prefect server SIGKILLed at a random point of a running recipe and started again on the same database,
    `trials` times on one run folder: the recipe finishes or fails cleanly; its rerun reuses every stage that had
    finished and resumes the one that had not (none done twice from scratch); the server lists every run."""
    result = TrialResult("Prefect server killed and restarted mid-recipe")
    home = work / "prefect-home"
    port = _free_port()
    log = work / "server.log"
    env = os.environ | _prefect_env(home, port)
    server = _start_prefect_server(home, port, log)
    outcomes, recover = [], []
    try:
        for i in range(trials):
            run, form = work / f"run-{i}", work / f"recipe-{i}.json"  # each trial's recipe starts from nothing
            form.write_text(json.dumps(_recipe_form(corpus_dir, run)))
            args = [sys.executable, "-m", "flows.cli", "recipe", "--config", str(form)]
            recipe = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True)
            time.sleep(rng.uniform(5.0, 40.0))
            if recipe.poll() is not None:
                continue
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            result.trials += 1
            time.sleep(rng.uniform(1.0, 5.0))
            server = _start_prefect_server(home, port, log)
            _, err = recipe.communicate(timeout=900)
            last = next((line for line in reversed(err.splitlines()) if line.startswith("mlpl: error:")), "")
            outcomes.append("finished" if recipe.returncode == 0 else f"failed ({last[:120] or recipe.returncode})")
            finished = {p.parent.name for p in run.glob("*/result.json")} | {
                f"{p.parent.parent.name}/{p.parent.name}" for p in run.glob("*/*/result.json")}
            for problem in partial_files(str(run), temp_ok=True):
                result.fail(problem)
            t0 = time.perf_counter()
            rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
            recover.append(time.perf_counter() - t0)
            for problem in partial_files(str(run)):
                result.fail(problem)
            if rerun.returncode != 0:
                result.fail(f"rerun failed: {rerun.stderr.strip().splitlines()[-1:]}")
                continue
            record = json.loads((run / "report" / "recipe_run.json").read_text())
            again = [name for name, st in record["stages"].items() if name in finished and not st.get("cached")]
            if again:
                result.fail(f"stages done again from scratch after the restart: {again}")
            _add_comparison(result, compare_recipe_runs(reference_recipe(corpus_dir, work.parent), run))
        states = _recipe_run_states(home, port)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    result.recover_s = sum(recover) / len(recover) if recover else None
    result.note = (f"the recipe, its server killed: {'; '.join(outcomes) or 'none'}; the server's mlpl-recipe runs: "
                   f"{', '.join(states)}")
    return result


# --- trial: S3 throttling, errors and dropped connections -----------------------------------------------------

_S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           # botocore's standard retry mode (exponential backoff with jitter, throttling codes included), 10 tries:
           # what the README tells operators to set for a store under load.
           "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}


@contextlib.contextmanager
def _moto_server(log_path: Path):
    """moto's S3 server in its own process on a free port: its endpoint URL."""
    import urllib.request

    port = _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start (log: {log_path})") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _s3_endpoint(endpoint: str):
    """This process (and the processes it starts) talk S3 to `endpoint` inside the block."""
    import s3fs

    saved = {k: os.environ.get(k) for k in [*_S3_ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(_S3_ENV | {"AWS_ENDPOINT_URL_S3": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()  # an instance keeps the endpoint it was made with
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def s3_transient_errors(corpus_dir: str, teacher: str, work: Path, reference: str, trials: int,
                        rng: random.Random, fail_share: float = 0.1) -> TrialResult:
    """Labeling into s3:// and a training run saving checkpoints there, `trials` times each, with a share of every
    request to moto's S3 server failed (503 SlowDown, 500, a dropped connection); each result, copied back,
    compared with the reference (labels) or an uninterrupted local run (weights)."""
    from pipeline.stages.supervised import run_supervised
    from storage.faults import FlakyS3Proxy
    from storage.files import download_tree

    result = TrialResult("S3 throttling, 5xx and dropped connections while labeling and saving checkpoints")
    label_cfg = label_tiny(split_manifest(corpus_dir, "unlabeled"), _teachers(teacher), unit_max_utterances=2)
    train_cfg = supervised_tiny(split_manifest(corpus_dir, "labeled"), None, max_updates=12, save_every=4,
                                eval_every=12)
    want = load_checkpoint(run_supervised(train_cfg, str(work / "local")).last_checkpoint)["model"]
    injected, requests = 0, 0
    with _moto_server(work / "moto.log") as upstream:
        with _s3_endpoint(upstream):
            import s3fs

            s3fs.S3FileSystem().mkdir("faults")
        for i in range(trials):
            runs = {"labeling": partial(run_label, label_cfg, f"s3://faults/labels-{i}"),
                    "training": partial(run_supervised, train_cfg, f"s3://faults/run-{i}")}
            with FlakyS3Proxy(upstream, fail_share, seed=rng.randrange(1 << 30)) as proxy, \
                    _s3_endpoint(proxy.endpoint):
                for name, run in runs.items():
                    try:
                        run()
                    except Exception as err:  # retries exhausted: reported; the clean rerun below finishes it
                        result.fail(f"{name} under faults failed: {type(err).__name__}: {str(err)[:200]}")
                injected, requests = injected + sum(proxy.injected.values()), requests + proxy.requests
            result.trials += 1
            with _s3_endpoint(upstream):
                for run in runs.values():
                    _clean_rerun(result, run)  # a no-op for what finished: committed work is skipped
                download_tree(f"s3://faults/labels-{i}", str(work / f"labels-{i}"))
                got = load_checkpoint(f"s3://faults/run-{i}/supervised/checkpoints/last.pt")["model"]
            for problem in partial_files(str(work / f"labels-{i}")):
                result.fail(problem)
            found = compare_labels(reference, str(work / f"labels-{i}"))
            found["differing"] += sum(not torch.equal(want[k], got[k]) for k in want)
            _add_comparison(result, found)
    result.note = (f"{injected} of {requests} requests failed on purpose ({100 * fail_share:.0f} %: SlowDown, "
                   "InternalError, dropped); botocore standard retries, 10 attempts; s3fs retries too")
    return result


# --- the harness ----------------------------------------------------------------------------------------------


def fault_teacher(corpus_dir: str, out_dir: str, updates: int = 150) -> str:
    """A quickly trained teacher to label with, trained once into `<out_dir>/teacher` (its PLs are poor; the trials
    compare runs with each other, not with the truth)."""
    from pipeline.stages.supervised import run_supervised

    cfg = supervised_tiny(split_manifest(corpus_dir, "labeled"), None, max_updates=updates, save_every=updates)
    return run_supervised(cfg, str(Path(out_dir, "teacher"))).last_checkpoint


def run_faults(corpus_dir: str, teacher: str, work_dir: str, trials: int = 3, seed: int = 0,
               only: list[str] | None = None) -> list[TrialResult]:
    """Every trial (or those named in `only`) in `<work_dir>/trials`, emptied first."""
    work = Path(work_dir, "trials")
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(seed)
    reference = str(work / "reference-labels")
    if only is None or {"s3", "disk_full_labeling", "truncated_shard", "corrupt_table"} & set(only):
        run_label(label_tiny(split_manifest(corpus_dir, "unlabeled"), _teachers(teacher), unit_max_utterances=2),
                  reference)
    plan: dict[str, Callable[[Path], TrialResult]] = {
        "s3": lambda w: s3_transient_errors(corpus_dir, teacher, w, reference, trials, rng),
        "disk_full_labeling": lambda w: disk_full_labeling(corpus_dir, teacher, w, reference, trials, rng),
        "disk_full_checkpoints": lambda w: disk_full_checkpoints(corpus_dir, w, trials, rng),
        "relabel": lambda w: relabel_killed_holding_its_lock(corpus_dir, teacher, w, trials, rng),
        "truncated_shard": lambda w: truncated_shard(corpus_dir, teacher, w, reference, trials, rng),
        "corrupt_table": lambda w: corrupt_table_file(corpus_dir, teacher, w, reference, rng),
        "two_recipes": lambda w: two_recipes_on_one_run_folder(corpus_dir, w, trials, rng),
        "prefect_server": lambda w: prefect_server_restarted(corpus_dir, w, trials, rng),
    }
    results = []
    for name, trial in plan.items():
        if only is None or name in only:
            (work / name).mkdir(parents=True, exist_ok=True)
            results.append(trial(work / name))
    return results


def format_faults(results: list[TrialResult], cpu: str, command: str, wall_s: float | None = None) -> str:
    """The fault table as Markdown."""
    took = "" if wall_s is None else f"; {wall_s / 60:.1f} min in all (corpus and teacher included when built)"
    lines = [f"Command: `{command}`; {cpu}, 2 cores{took}. Trials: faults that landed while the component was "
             "working; samples differing: PL rows, shard samples and model tensors unequal to the uninterrupted "
             "run's, timestamps aside.", "",
             "| fault | trials | recovered | rows lost | rows duplicated | samples differing | recover s | how |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.fault} | {r.trials} | {'yes' if r.recovered else '**no**'} | {r.rows_lost} | "
                     f"{r.rows_duplicated} | {r.differing} | "
                     f"{'—' if r.recover_s is None else f'{r.recover_s:.1f}'} | {r.note} |")
    problems = [f"- {r.fault}: {p}" for r in results for p in r.problems]
    return "\n".join(lines + (["", "What did not hold:", *problems] if problems else []))


def results_json(results: list[TrialResult]) -> str:
    """The results as JSON (for tests and the log)."""
    return json.dumps([asdict(r) for r in results], indent=2)
