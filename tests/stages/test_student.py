"""The student (recipe step 5): source mixing, the streaming PL reader, read-time filters, starting weights,
labeled-only fine-tune, bad PL samples and exact resume; the recipe config."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from pipeline.config import (
    AudioPolicy,
    BatchConfig,
    FeatureConfig,
    ModelConfig,
    RecipeConfig,
    recipe_demo,
    student_tiny,
)
from pipeline.data.audio import encode_flac
from pipeline.data.pl_stream import PLBatchStream, pl_samples
from pipeline.engine.model import load_trained
from pipeline.stages.common import seed_everything
from pipeline.stages.student import SourceMixer, build_student, pl_rows, run_student
from storage.pl import LabelStore, load_pseudo_labels

QUICK = {"max_updates": 12, "eval_every": 6, "save_every": 3, "log_every": 3, "pl_window_shards": 1,
         "optim": {"warmup_updates": 2},
         "pl_batch": {"max_batch_duration_s": 60.0, "max_batch_size": 2, "num_buckets": 2}}


def _m(corpus: str, name: str) -> str:
    return f"{corpus}/manifests/{name}.jsonl"


def _student(corpus: str, init: str, labels: str, mode: str = "finetune", **overrides):
    cfg = student_tiny(mode, _m(corpus, "labeled"), _m(corpus, "dev"), init_checkpoint=init, labels_root=labels)
    data = cfg.model_dump(mode="json")
    for k, v in (QUICK | overrides).items():
        data[k] = data[k] | v if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return type(cfg)(**data)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- source mixing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [{"labeled": 1.0, "pl": 3.0}, {"labeled": 370.2, "pl": 261.9},
                                     {"labeled": 0.1, "pl": 0.9}])
def test_source_mixing_hits_the_configured_proportions_over_a_long_stream(weights):
    mixer = SourceMixer(weights, seed=3)
    draws = [mixer.choose(step) for step in range(20000)]
    share = draws.count("pl") / len(draws)
    assert share == pytest.approx(weights["pl"] / sum(weights.values()), abs=0.012)
    # The draw is a pure function of (seed, update): a resumed run sees the same sources.
    assert draws[5000:5100] == [SourceMixer(weights, seed=3).choose(s) for s in range(5000, 5100)]
    assert draws != [SourceMixer(weights, seed=4).choose(s) for s in range(20000)]


def test_a_source_with_zero_weight_is_never_drawn():
    mixer = SourceMixer({"labeled": 1.0, "pl": 0.0})
    assert {mixer.choose(s) for s in range(2000)} == {"labeled"}
    with pytest.raises(ValueError, match="positive weight"):
        SourceMixer({"labeled": 0.0, "pl": 0.0})


# --- the streaming PL reader ---------------------------------------------------------------------------------

def _pl_corpus(root: Path, shards: int, per_shard: int = 3, seconds: float = 1.0) -> str:
    """A PL corpus of `shards` small units (noise clips, PL text "ab"), committed through the LabelStore."""
    store = LabelStore(str(root))
    rng = np.random.default_rng(0)
    for unit in range(shards):
        writer = store.open_shard("sl", unit)
        rows = []
        for j in range(per_shard):
            uid = f"u{unit:04d}_{j}"
            wav = torch.from_numpy((0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32))
            writer.write(uid, encode_flac(wav, 16000), {"id": uid})
            rows.append({"id": uid, "audio": f"/x/{uid}.flac", "duration_s": seconds, "text": "ab",
                         "num_tokens": 2, "confidence": 0.9, "lid_pred": "sl", "lid_prob": 0.9, "blank_ratio": 0.5,
                         "teacher": "slimipl/sl@1:abc", "decode": "d", "shard": store.shard_relpath("sl", unit),
                         "key": uid})
        store.commit_unit("sl", unit, shard=writer, rows=rows, rejects=[],
                          record={"language": "sl", "unit": unit, "keys": {}, "rows": per_shard})
    return str(root)


def _stream(root: str, window_shards: int = 2) -> PLBatchStream:
    samples, rejects = pl_samples(load_pseudo_labels(root), root, 40.0)
    assert not rejects
    return PLBatchStream(samples, root, features=FeatureConfig(), policy=AudioPolicy(),
                         batch=BatchConfig(max_batch_duration_s=4.0, max_batch_size=4, num_buckets=2),
                         window_shards=window_shards, seed=1)


def _one_epoch(stream: PLBatchStream) -> list[str]:
    seen = []
    for utts, feats in stream:
        assert [f.shape[1] for f in feats] == [80] * len(utts)
        seen += [u.id for u in utts]
        if stream.state_dict()["epoch"] == 0 and len(seen) == len(stream.samples):
            return seen
    raise AssertionError("unreachable")


def test_the_streaming_reader_covers_each_sample_once_per_epoch_and_resumes_at_its_position(tmp_path):
    root = _pl_corpus(tmp_path / "pl", shards=7)
    stream = _stream(root)
    seen = _one_epoch(stream)
    assert sorted(seen) == sorted(s.utterance.id for s in stream.samples)  # every sample, once
    assert _one_epoch(_stream(root)) == seen  # the order is a function of the seed
    batches = iter(_stream(root))
    stream = _stream(root)
    it = iter(stream)
    for _ in range(4):
        next(it)
        next(batches)
    state = json.loads(json.dumps(stream.state_dict()))  # the state survives a JSON round trip
    resumed = _stream(root)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for _ in range(12):  # across window and epoch boundaries
        assert [u.id for u in next(again)[0]] == [u.id for u in next(batches)[0]]


def test_the_streaming_readers_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    peaks = {}
    for shards in (6, 60):
        stream = _stream(_pl_corpus(tmp_path / f"pl{shards}", shards=shards, seconds=2.0), window_shards=2)
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        assert len(_one_epoch(stream)) == 3 * shards
        peaks[shards] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    # One window (2 shards × 3 clips × 2 s of FLAC ≈ 0.2 MB) is held at a time, whatever the shard count.
    assert peaks[60] < 1.3 * peaks[6] + 64_000, peaks


def test_overlong_pl_clips_and_unreadable_samples_become_rejects_and_the_rest_streams(tmp_path):
    root = _pl_corpus(tmp_path / "pl", shards=3)
    df = load_pseudo_labels(root)
    df.loc[0, "duration_s"] = 45.0
    samples, rejects = pl_samples(df, root, 40.0)
    assert [r.id for r in rejects] == [df.loc[0, "id"]] and "45.0 s" in rejects[0].reason
    Path(root, "shards/pl-sl-000001.tar").unlink()
    stream = PLBatchStream(samples, root, features=FeatureConfig(), policy=AudioPolicy(),
                           batch=BatchConfig(max_batch_duration_s=4.0, max_batch_size=4, num_buckets=1),
                           window_shards=1, seed=0)
    seen = []
    for utts, _ in stream:
        seen += [u.id for u in utts]
        if stream.state_dict()["epoch"] > 0:
            break
    lost = {f"u0001_{j}" for j in range(3)}
    assert {r.id for r in stream.rejects} == lost
    assert all("shard file not found" in r.reason for r in stream.rejects)
    assert set(seen) == {s.utterance.id for s in samples} - lost


def test_a_corpus_whose_every_sample_is_unreadable_fails_with_a_reason(tmp_path):
    root = _pl_corpus(tmp_path / "pl", shards=2)
    samples, _ = pl_samples(load_pseudo_labels(root), root, 40.0)
    shutil.rmtree(Path(root, "shards"))
    stream = PLBatchStream(samples, root, features=FeatureConfig(), policy=AudioPolicy(),
                           batch=BatchConfig(max_batch_duration_s=4.0), window_shards=1)
    with pytest.raises(ValueError, match="none of the 6 pseudo-labeled samples"):
        next(iter(stream))


# --- read-time filters -----------------------------------------------------------------------------------------

def test_the_students_filters_select_exactly_what_a_pandas_query_selects(smoke_corpus, teacher, labeled_root):
    raw = pd.read_parquet(f"{labeled_root}/pl")
    conf, tokens = float(raw["confidence"].quantile(0.25)), int(raw["num_tokens"].quantile(0.8))
    sha = raw["teacher"].iloc[0].split(":")[1][:8]
    cfg = _student(smoke_corpus, teacher, labeled_root, pl_filter={
        "min_confidence": conf, "max_tokens": tokens, "min_tokens": 3, "require_lid_agreement": True},
        pl_teacher=sha)
    got = pl_rows(cfg, labeled_root, ["es", "sl"])
    want = raw[raw["language"].isin(["es", "sl"]) & (raw["confidence"] >= conf) & (raw["num_tokens"] <= tokens)
               & (raw["num_tokens"] >= 3) & (raw["lid_pred"] == raw["language"].astype(str))
               & raw["teacher"].str.split(":").str[1].str.startswith(sha)]
    assert sorted(got["id"]) == sorted(want["id"]) and 0 < len(got) < len(raw)
    unfiltered = pl_rows(_student(smoke_corpus, teacher, labeled_root), labeled_root, ["es", "el", "sl"])
    assert len(unfiltered) == len(raw[(raw["num_tokens"] >= 1) & (raw["num_tokens"] <= 630)])


# --- starting weights ------------------------------------------------------------------------------------------

def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finetune_starts_from_the_init_weights_and_from_scratch_from_new_ones(smoke_corpus, teacher, labeled_root):
    init = _params(load_trained(teacher).model)
    ft, _ = build_student(_student(smoke_corpus, teacher, labeled_root, "finetune"), load_trained(teacher))
    assert all(torch.equal(v, init[k]) for k, v in _params(ft).items())
    scratch, kwargs = build_student(_student(smoke_corpus, teacher, labeled_root, "from_scratch"),
                                    load_trained(teacher))
    fresh = _params(scratch)
    assert set(fresh) == set(init) and all(v.shape == init[k].shape for k, v in fresh.items())
    weights = [k for k in fresh if k.endswith("weight") and fresh[k].dim() > 1]
    assert not any(torch.equal(fresh[k], init[k]) for k in weights)  # nothing copied from the teacher
    seed_everything(0)  # as open_stage does: a new model is drawn from the seeded global RNG
    seeded, _ = build_student(_student(smoke_corpus, teacher, labeled_root, "from_scratch"), load_trained(teacher))
    seed_everything(0)
    again, _ = build_student(_student(smoke_corpus, teacher, labeled_root, "from_scratch"), load_trained(teacher))
    assert all(torch.equal(v, _params(seeded)[k]) for k, v in _params(again).items())
    # A student of another size: the vocabulary, languages and front end stay the teacher's.
    big = ModelConfig(d_model=192, n_layers=2, n_heads=4, ffn_dim=384, dropout=0.0, layerdrop=0.0)
    large, large_kwargs = build_student(_student(smoke_corpus, teacher, labeled_root, "from_scratch", model=big),
                                        load_trained(teacher))
    assert (large_kwargs["d_model"], large_kwargs["n_layers"]) == (192, 2)
    assert {k: large_kwargs[k] for k in ("vocab_size", "num_languages", "n_mels")} == {
        k: kwargs[k] for k in ("vocab_size", "num_languages", "n_mels")}
    with pytest.raises(ValidationError, match="only for mode=from_scratch"):
        _student(smoke_corpus, teacher, labeled_root, "finetune", model=big)


def test_the_stage_writes_its_starting_weights_and_then_trains_on_both_sources(smoke_corpus, teacher,
                                                                               labeled_root, tmp_path):
    cfg = _student(smoke_corpus, teacher, labeled_root, "finetune")
    run_student(cfg, str(tmp_path / "run"), stop_after=0)
    saved = torch.load(tmp_path / "run/student/finetune/checkpoints/last.pt", weights_only=True)
    init = torch.load(teacher, weights_only=True)["model"]
    assert saved["step"] == 0 and all(torch.equal(v, init[k]) for k, v in saved["model"].items())
    result = run_student(cfg, str(tmp_path / "run"))
    assert result.step == 12 and result.extra["updates_by_source"]["pl"] > 0
    assert sum(result.extra["updates_by_source"].values()) == 12
    history = _jsonl(tmp_path / "run/student/finetune/metrics.jsonl")
    assert {h["kind"] for h in history} == {"labeled", "pl"}
    w = result.extra["weights"]  # natural proportions: each source's share of audio seconds
    src = result.extra["sources"]
    assert w["pl"] == pytest.approx(src["pl"]["audio_s"] / (src["pl"]["audio_s"] + src["labeled"]["audio_s"]),
                                    abs=1e-3)
    # The labeled-only fine-tune continues this student's weights and never reads a PL.
    ft = _student(smoke_corpus, result.best_checkpoint, labeled_root, "finetune", labeled_only=True,
                  variant="finetune-labeled-ft", max_updates=3)
    run_student(ft, str(tmp_path / "run"), stop_after=0)
    start = torch.load(tmp_path / "run/student/finetune-labeled-ft/checkpoints/last.pt", weights_only=True)
    best = torch.load(result.best_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(v, best[k]) for k, v in start["model"].items())
    done = run_student(ft, str(tmp_path / "run"))
    assert done.extra["updates_by_source"] == {"labeled": 3, "pl": 0} and done.extra["labels_root"] is None


def test_specaugment_starts_after_its_delay(smoke_corpus, teacher, labeled_root, tmp_path, monkeypatch):
    import pipeline.stages.student as student

    calls = []
    real = student.collate

    def spy(*args, **kwargs):
        calls.append(kwargs["specaugment"] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(student, "collate", spy)
    cfg = _student(smoke_corpus, teacher, labeled_root, "from_scratch", specaugment_start_updates=4, max_updates=7,
                   eval_every=7)
    run_student(cfg, str(tmp_path / "run"))
    assert calls == [False] * 4 + [True] * 3


def test_a_finetuned_student_is_seeded_like_every_other_stage(smoke_corpus, teacher, labeled_root, tmp_path):
    cfg = _student(smoke_corpus, teacher, labeled_root, "finetune", max_updates=4, eval_every=4, save_every=4)

    def trained(run: str, seed: int) -> dict[str, torch.Tensor]:
        torch.rand(7919)  # whatever the process drew before the stage must not change what it draws
        result = run_student(cfg.model_copy(update={"seed": seed}), str(tmp_path / run))
        return torch.load(result.last_checkpoint, weights_only=True)["model"]

    first, again, other = trained("a", 0), trained("b", 0), trained("c", 1)
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed: bit-equal weights
    assert any(not torch.equal(first[k], other[k]) for k in first)


# --- resume ------------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def test_killing_the_student_and_rerunning_resumes_it_exactly(smoke_corpus, teacher, labeled_root, tmp_path):
    cfg = _student(smoke_corpus, teacher, labeled_root, "from_scratch", specaugment_start_updates=2)
    run_student(cfg, str(tmp_path / "straight"))

    def kill_at_8(done, total, desc):
        if desc.startswith("train") and done == 8:
            raise Killed

    with pytest.raises(Killed):
        run_student(cfg, str(tmp_path / "killed"), on_progress=kill_at_8)  # last.pt holds update 6
    assert torch.load(tmp_path / "killed/student/from_scratch/checkpoints/last.pt", weights_only=True)["step"] == 6
    run_student(cfg, str(tmp_path / "killed"))
    drop = {"grad_norm"}  # bitwise equal too, but clip norms print with 4 decimals either way
    straight, killed = (_jsonl(tmp_path / r / "student/from_scratch/metrics.jsonl") for r in ("straight", "killed"))
    assert [h["step"] for h in killed] == list(range(1, 13))  # each update once
    assert [{k: v for k, v in h.items() if k not in drop} for h in killed] == [
        {k: v for k, v in h.items() if k not in drop} for h in straight]
    a, b = (torch.load(tmp_path / r / "student/from_scratch/checkpoints/last.pt", weights_only=True)["model"]
            for r in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_relabeled_pl_corpus(smoke_corpus, teacher, labeled_root, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(labeled_root, labels)
    cfg = _student(smoke_corpus, teacher, str(labels))
    run_student(cfg, str(tmp_path / "run"), stop_after=3)
    part = next((labels / "pl").rglob("part-*.parquet"))
    df = pd.read_parquet(part)
    df.loc[0, "text"] = "something else"
    df.to_parquet(part)
    with pytest.raises(ValueError, match="other inputs \\(pl changed\\)"):
        run_student(cfg, str(tmp_path / "run"))


def test_a_student_without_any_pl_after_its_filters_says_what_to_do(smoke_corpus, teacher, labeled_root, tmp_path):
    cfg = _student(smoke_corpus, teacher, labeled_root, pl_filter={"min_confidence": 1.0})
    with pytest.raises(ValueError, match="no pseudo-labels .* pass the student's filters"):
        run_student(cfg, str(tmp_path / "run"))
    with pytest.raises(ValidationError, match="unknown source"):
        _student(smoke_corpus, teacher, labeled_root, source_weights={"labeled": 1.0, "web": 1.0})


# --- the recipe config ------------------------------------------------------------------------------------

def test_the_recipe_config_builds_every_stage_and_refuses_a_bad_override_before_any_runs():
    cfg = recipe_demo("data/demo", "runs/demo")
    assert cfg.supervised_config().max_updates == 400 and cfg.supervised_config().optim.warmup_updates == 40
    assert cfg.slimipl_config("sl").reference_manifest == "data/demo/hidden/unlabeled_reference.jsonl"
    ft = cfg.labeled_finetune_config("finetune", "runs/demo/student/finetune/checkpoints/best.pt")
    assert ft.labeled_only and ft.variant_name() == "finetune-labeled-ft" and ft.mode == "finetune"
    assert cfg.student_config("finetune").optim.lr == 1.5e-3 and cfg.labeling_lm == "char"
    assert cfg.label_config({"sl": "t.pt"}).audit_manifest == "data/demo/manifests/dev.jsonl"
    nested = recipe_demo("d", "r", student={"optim": {"lr": 5e-4}})
    optim = nested.student_config("finetune").optim
    assert optim.lr == 5e-4 and optim.name == "adamw"  # a nested override changes only its field
    for bad, where in (({"student": {"max_updates": -1}}, "max_updates"),
                       ({"slimipl": {"pl_cache_size": 0}}, "pl_cache_size"),
                       ({"student_modes": ["distilled"]}, "student_modes"),
                       ({"label": {"filters": {"min_tokens": 9, "max_tokens": 3}}}, "min_tokens")):
        with pytest.raises(ValidationError, match=where):
            recipe_demo("d", "r", **bad)
    schema = RecipeConfig.model_json_schema()
    assert all(field.get("description") for field in schema["properties"].values())


def test_the_bench_students_all_walk_twice_the_base_budget_and_the_control_walks_the_same():
    from pipeline.config import MODEL_PRESET_PARAMS, model_kwargs, recipe_bench
    from pipeline.config.recipe import BENCH_BASE_UPDATES
    from pipeline.stages.control import best_student

    cfg = recipe_bench("data/bench", "runs/bench")
    assert cfg.student_modes == ["finetune", "from_scratch", "from_scratch_large"] and cfg.same_compute_control
    base = cfg.supervised_config()
    assert base.max_updates == BENCH_BASE_UPDATES and base.model.encoder == "conformer"
    for mode in cfg.student_modes:  # every student's whole path: base + its own + its labeled-only fine-tune
        st, ft = cfg.student_config(mode), cfg.labeled_finetune_config(mode, "s.pt")
        assert base.max_updates + st.max_updates + ft.max_updates == cfg.path_updates(mode) == 2 * BENCH_BASE_UPDATES
    # Without finished students the first mode is the best; the control trains that path on labeled data alone.
    stage, updates = best_student(cfg)
    assert stage == "student/finetune-labeled-ft" and updates == 2 * BENCH_BASE_UPDATES
    control = cfg.control_config(updates)
    assert control.max_updates == updates and control.stage_name() == "supervised"
    assert control.model_dump(exclude={"max_updates"}) == base.model_dump(exclude={"max_updates"})
    # The large student: the paper's large, i.e. FFN and attention width doubled, depth kept, ≈ 4× the parameters.
    large = cfg.student_config("from_scratch_large")
    assert large.mode == "from_scratch" and large.variant_name() == "from_scratch_large"
    assert (large.model.d_model, large.model.ffn_dim, large.model.n_layers) == (288, 1216, 2)
    assert cfg.labeled_finetune_config("from_scratch_large", "s.pt").variant_name() == "from_scratch_large-labeled-ft"
    from models.encoder import CTCLIDModel, count_parameters

    def params(model: ModelConfig) -> int:
        return count_parameters(CTCLIDModel(**model_kwargs(model, 256, 6, 80)))

    small, big = params(base.model), params(large.model)
    assert small == pytest.approx(MODEL_PRESET_PARAMS["tiny_conformer"], rel=0.02)
    assert big == 4_389_678 and 3.6 < big / small < 3.8


def test_the_control_follows_the_student_with_the_lowest_dev_cer(tmp_path):
    import json

    from pipeline.config import recipe_bench
    from pipeline.stages.control import best_student

    cfg = recipe_bench("data/bench", str(tmp_path), student_by_mode={"from_scratch": {"max_updates": 500}})
    for stage, dev in (("finetune-labeled-ft", 30.0), ("from_scratch-labeled-ft", 28.5),
                       ("from_scratch_large-labeled-ft", None)):
        (tmp_path / "student" / stage).mkdir(parents=True)
        (tmp_path / "student" / stage / "result.json").write_text(json.dumps({"best": {"metric": dev}}))
    stage, updates = best_student(cfg)
    assert stage == "student/from_scratch-labeled-ft" and updates == cfg.path_updates("from_scratch")
    assert updates == cfg.supervised_config().max_updates + 500 + 50
    with pytest.raises(ValueError, match="trains none"):
        best_student(cfg.model_copy(update={"student_modes": []}))
