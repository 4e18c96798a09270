"""Supervised multilingual stage on the smoke corpus: learning, overfitting, resume, rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import SpecAugmentConfig, supervised_tiny
from pipeline.data import load_dataset
from pipeline.evaluate import decode_dataset
from pipeline.modeling import load_trained
from pipeline.train import run_supervised
from storage.manifest import read_manifest
from tests.dummies import bad_rows, write_jsonl


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
    cfg = supervised_tiny(train, None, max_updates=2, save_every=2,
                          optim={"name": "adamw", "lr": 2e-3, "warmup_updates": 1})
    run_supervised(cfg, str(tmp_path / "run"))
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
