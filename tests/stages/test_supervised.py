"""Supervised multilingual stage on the smoke corpus: learning, overfitting, resume, rejects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import SpecAugmentConfig, supervised_tiny
from pipeline.data.dataset import load_dataset
from pipeline.engine.decode import decode_dataset
from pipeline.engine.model import load_trained
from pipeline.stages.supervised import run_supervised
from storage.manifest import read_manifest
from tests.helpers.dummies import bad_rows, write_jsonl


def _manifests(corpus: str) -> tuple[str, str]:
    m = Path(corpus) / "manifests"
    return str(m / "labeled.jsonl"), str(m / "dev.jsonl")


@pytest.mark.slow
def test_loss_decreases_and_lid_beats_chance(smoke_corpus, tmp_path):
    train, dev = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, dev, max_updates=300, eval_every=300, log_every=100, save_every=300)
    result = run_supervised(cfg, str(tmp_path / "run"))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    # Three languages: chance is 33 %. Dev speakers are held out, so this is about languages, not voices.
    assert result.dev_metrics["all"]["lid_acc"] > 75.0, result.dev_metrics
    assert result.dev_metrics["all"]["cer"] < 70.0, result.dev_metrics


def test_overfits_a_handful_of_utterances(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    rows, _ = read_manifest(train)
    few = write_jsonl(tmp_path / "few.jsonl", [r for r in rows if r["language"] == "es"][:2]
                      + [r for r in rows if r["language"] == "el"][:2])
    cfg = supervised_tiny(
        few, None, max_updates=200, save_every=200, log_every=50,
        specaugment=SpecAugmentConfig(freq_masks=0, time_masks=0),
        model=supervised_tiny(few).model.model_copy(update={"dropout": 0.0}),
        optim={"name": "adamw", "lr": 3e-3, "warmup_updates": 20, "schedule": "constant"},
    )
    result = run_supervised(cfg, str(tmp_path / "run"))
    trained = load_trained(result.last_checkpoint)
    ds = load_dataset(few, features=cfg.features, policy=cfg.audio, require_text=True)
    out = decode_dataset(trained.model, ds, tokenizer=trained.tokenizer, languages=trained.languages,
                         batch=cfg.batch, bf16=cfg.bf16)
    assert {r["id"]: r["hypothesis"] for r in out} == {r["id"]: r["reference"] for r in out}
    assert all(r["lid_pred"] == r["language"] for r in out)


def test_resume_reproduces_the_next_losses(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, None, max_updates=8, save_every=4, log_every=4,
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 2, "schedule": "cosine"})
    reference = run_supervised(cfg, str(tmp_path / "straight")).losses
    first = run_supervised(cfg, str(tmp_path / "killed"), stop_after=4)  # as if killed after update 4
    assert first.step == 4
    resumed = run_supervised(cfg, str(tmp_path / "killed"))
    assert resumed.step == 8 and len(resumed.losses) == 4
    assert resumed.train_wall_s > first.train_wall_s > 0  # timing totals survive the kill
    torch.testing.assert_close(torch.tensor(first.losses + resumed.losses), torch.tensor(reference))
    history = [json.loads(line) for line in (tmp_path / "killed/supervised/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 9))  # nothing lost, nothing written twice


def test_resume_refuses_a_changed_config(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, None, max_updates=2, save_every=1,
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 1})
    run_supervised(cfg, str(tmp_path / "run"), stop_after=1)  # unfinished: half a run is never thrown away
    with pytest.raises(ValueError, match="--no-resume"):
        run_supervised(cfg.model_copy(update={"lid_weight": 0.5}), str(tmp_path / "run"))


def test_bad_rows_are_rejected_while_the_others_train(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    rows, _ = read_manifest(train)
    bad = bad_rows(tmp_path)
    dup = dict(rows[0])
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, rows + list(bad.values()) + [dup])
    with open(path, "ab") as f:
        f.write(b'{"id": "latin1", "text": "ni\xf1o", "language": "es", "audio": "x.flac"}\n')
    cfg = supervised_tiny(str(path), None, max_updates=3, save_every=3, languages=["el", "es", "sl"],
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 1})
    result = run_supervised(cfg, str(tmp_path / "run"))
    assert result.step == 3 and result.num_train_utterances == len(rows)
    rejects, _ = read_manifest(str(tmp_path / "run/supervised/rejects.jsonl"))
    reasons = {r["id"]: r["reason"] for r in rejects}
    for kind, row in bad.items():
        assert kind in reasons[row["id"]]
    assert any("duplicate id" in r for r in reasons.values())
    assert any("UTF-8" in r for r in reasons.values())
    assert len(rejects) == len(bad) + 2


class Killed(Exception):
    """Stands in for SIGKILL between two checkpoints: nothing after it is saved."""


def _kill_at(step: int):
    def on_progress(done: int, total: int, desc: str) -> None:
        if desc.startswith("train") and done == step:
            raise Killed(f"killed after update {step}")

    return on_progress


def test_a_kill_between_checkpoints_resumes_from_the_last_one(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, None, max_updates=10, save_every=4, log_every=5,
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 2, "schedule": "cosine"})
    run_supervised(cfg, str(tmp_path / "straight"))
    with pytest.raises(Killed):
        run_supervised(cfg, str(tmp_path / "killed"), on_progress=_kill_at(7))  # last.pt holds update 4
    assert torch.load(tmp_path / "killed/supervised/checkpoints/last.pt", weights_only=True)["step"] == 4
    resumed = run_supervised(cfg, str(tmp_path / "killed"))
    assert resumed.step == 10 and len(resumed.losses) == 6  # updates 5-10 again, from the saved record

    def history(run):
        return [json.loads(x) for x in (tmp_path / run / "supervised/metrics.jsonl").read_text().splitlines()]

    straight, killed = history("straight"), history("killed")
    assert [h["step"] for h in killed] == list(range(1, 11))  # each update once
    torch.testing.assert_close(torch.tensor([h["loss"] for h in killed]), torch.tensor([h["loss"] for h in straight]))


def test_a_finished_run_can_be_extended_and_resumed_with_other_threads(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, None, max_updates=4, save_every=4,
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 1, "schedule": "constant"})
    run_supervised(cfg, str(tmp_path / "run"))
    longer = cfg.model_copy(update={"max_updates": 6, "num_threads": 1, "log_every": 3})
    assert run_supervised(longer, str(tmp_path / "run")).step == 6


def _own_copy(smoke_corpus: str, tmp_path, **fields):
    """The labeled rows in a manifest of the test's own (so it can change them) and a 2-update config on it."""
    rows, _ = read_manifest(_manifests(smoke_corpus)[0])
    mine = write_jsonl(tmp_path / "train.jsonl", rows)
    return rows, supervised_tiny(mine, None, max_updates=2, optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 1},
                                 **fields)


def test_resume_refuses_changed_training_data(smoke_corpus, tmp_path):
    rows, cfg = _own_copy(smoke_corpus, tmp_path, save_every=1)
    run_supervised(cfg, str(tmp_path / "run"), stop_after=1)
    write_jsonl(tmp_path / "train.jsonl", rows[:-1])
    with pytest.raises(ValueError, match="train changed"):
        run_supervised(cfg, str(tmp_path / "run"))


def test_best_checkpoint_is_the_lowest_dev_cer(smoke_corpus, tmp_path):
    train, dev = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, dev, max_updates=60, eval_every=20, save_every=20, log_every=20)
    result = run_supervised(cfg, str(tmp_path / "run"))
    evals = json.loads((tmp_path / "run/supervised/dev_evals.json").read_text())
    assert [e["step"] for e in evals] == [20, 40, 60]
    best = min(evals, key=lambda e: (e["metrics"]["macro"]["cer"], e["step"]))
    saved = torch.load(result.best_checkpoint, weights_only=True)
    assert saved["step"] == best["step"] == result.best["step"]
    assert result.precision in ("fp32", "bf16") and result.stage_wall_s >= result.train_wall_s > 0


def test_a_non_finite_loss_skips_the_update():
    from models.encoder import CTCLIDModel
    from pipeline.data.dataset import Batch
    from pipeline.engine.trainer import make_optimizer, train_step

    torch.manual_seed(0)
    model = CTCLIDModel(vocab_size=10, num_languages=2, d_model=32, n_layers=1, n_heads=4, ffn_dim=64, dropout=0.0)
    opt = make_optimizer(supervised_tiny("t").optim, model)
    feats = torch.randn(2, 100, 80)
    feats[0, 5, 3] = float("nan")
    batch = Batch(["a", "b"], feats, torch.tensor([100, 90]), torch.tensor([[2, 3], [4, 0]]), torch.tensor([2, 1]),
                  torch.tensor([0, 1]))
    before = [p.detach().clone() for p in model.parameters()]
    info, grad_norm = train_step(model, opt, batch, lid_weight=1.0, grad_clip_norm=1.0, bf16=False)
    assert grad_norm is None and not torch.isfinite(torch.tensor(info["loss"]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    batch = batch._replace(feats=torch.randn(2, 100, 80))
    assert train_step(model, opt, batch, lid_weight=1.0, grad_clip_norm=1.0, bf16=False)[1] is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_transcripts_too_long_for_the_configured_stride_are_rejected(tmp_path):
    from pipeline.config import AudioPolicy, FeatureConfig
    from pipeline.data.dataset import reject_untrainable
    from pipeline.data.tokenizer import CharTokenizer
    from tests.helpers.dummies import good_row

    # 1 s of audio: 98 fbank frames → 33 CTC frames at stride 3, 17 at stride 6.
    rows = [good_row(tmp_path, "short", text="ab" * 12, duration_s=1.0),
            good_row(tmp_path, "ok", text="abc", duration_s=1.0),
            good_row(tmp_path, "tiny", text="a", duration_s=0.2)]
    url = write_jsonl(tmp_path / "m.jsonl", rows)
    ds = load_dataset(url, features=FeatureConfig(), policy=AudioPolicy(), require_text=True)
    assert "shorter than audio.min_duration_s" in {r.id: r.reason for r in ds.rejects}["tiny"]
    tok = CharTokenizer.train(["ab", "c"])
    assert [u.id for u in reject_untrainable(ds, tok, 7, 3).utterances] == ["short", "ok"]
    out = reject_untrainable(ds, tok, 7, 6)
    assert [u.id for u in out.utterances] == ["ok"]
    reason = {r.id: r.reason for r in out.rejects}["short"]
    assert "needs 24 CTC frames but the audio gives 17" in reason


def test_result_json_is_strict_json_without_dev_data(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, None, max_updates=2, save_every=2,
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 1})
    run_supervised(cfg, str(tmp_path))
    text = (tmp_path / "supervised/result.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in result.json"))
    assert result["best"]["metric"] is None and result["step"] == 2 and result["precision"] in ("fp32", "bf16")


def test_a_finished_stage_is_reused_until_its_config_inputs_or_outputs_change(smoke_corpus, tmp_path):
    rows, cfg = _own_copy(smoke_corpus, tmp_path, save_every=2)
    run = str(tmp_path / "run")
    first = run_supervised(cfg, run)
    best = tmp_path / "run/supervised/checkpoints/best.pt"
    stamp = best.stat().st_mtime_ns
    again = run_supervised(cfg.model_copy(update={"num_threads": 1}), run)  # threads are not part of the key
    assert again.cached and not first.cached and again.losses == [] and again.step == 2
    assert best.stat().st_mtime_ns == stamp and again.best_checkpoint == first.best_checkpoint
    changed = run_supervised(cfg.model_copy(update={"lid_weight": 0.5}), run)  # a finished run: train again
    assert not changed.cached and len(changed.losses) == 2 and best.stat().st_mtime_ns != stamp
    assert run_supervised(cfg.model_copy(update={"lid_weight": 0.5}), run).cached
    best.unlink()  # a recorded output deleted: the stage reruns instead of returning a stale path
    rerun = run_supervised(cfg.model_copy(update={"lid_weight": 0.5}), run)
    assert not rerun.cached and len(rerun.losses) == 2 and best.exists()
    write_jsonl(tmp_path / "train.jsonl", rows[:-1])  # other inputs
    assert not run_supervised(cfg.model_copy(update={"lid_weight": 0.5}), run).cached


def test_a_copied_run_folder_reuses_its_own_checkpoints_not_the_originals(smoke_corpus, tmp_path):
    _, cfg = _own_copy(smoke_corpus, tmp_path, save_every=2)
    first = run_supervised(cfg, str(tmp_path / "run"))
    shutil.copytree(tmp_path / "run", tmp_path / "branch")  # branching an experiment off a finished run
    shutil.rmtree(tmp_path / "run")
    again = run_supervised(cfg, str(tmp_path / "branch"))
    assert again.cached and again.step == first.step
    assert again.best_checkpoint == str(tmp_path / "branch/supervised/checkpoints/best.pt")
    assert again.stage_dir.startswith(str(tmp_path / "branch")) and Path(again.last_checkpoint).exists()


def test_the_device_comes_from_the_config_and_is_not_part_of_the_resume_key(smoke_corpus, tmp_path):
    train, _ = _manifests(smoke_corpus)
    cfg = supervised_tiny(train, None, max_updates=2, save_every=1, device="cpu",
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 1})
    run_supervised(cfg, str(tmp_path / "run"), stop_after=1)
    resumed = run_supervised(cfg.model_copy(update={"device": "auto"}), str(tmp_path / "run"))
    assert resumed.step == 2 and len(resumed.losses) == 1  # resumed on "auto", not refused
    on_gpu = cfg.model_copy(update={"device": "cuda"})
    if torch.cuda.is_available():  # the GPU path, where one exists
        result = run_supervised(on_gpu, str(tmp_path / "gpu"))
        assert result.step == 2 and load_trained(result.best_checkpoint).model is not None
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            run_supervised(on_gpu, str(tmp_path / "gpu"))
