"""Per-language fine-tuning and slimIPL on the smoke corpus: cache, λ, eval-mode labeling, exact resume,
collapse guard, bad unlabeled rows."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from pipeline.config import finetune_tiny, supervised_tiny
from pipeline.engine.crops import PAD_FRAMES_MULTIPLE, pad_time_to_multiple
from pipeline.engine.model import load_trained
from pipeline.stages.finetune import run_finetune
from pipeline.stages.pl_cache import CollapseError, choose_slot, is_labeled_step
from pipeline.stages.slimipl import label_batch, run_slimipl
from pipeline.stages.supervised import run_supervised
from storage.manifest import read_manifest
from tests.helpers.configs import smoke_manifest as _m
from tests.helpers.configs import tiny_slimipl
from tests.helpers.dummies import bad_rows, write_jsonl


@pytest.fixture(scope="module")
def newborn(smoke_corpus, tmp_path_factory) -> str:
    """A model after 15 updates: CTC still emits only blanks, so its pseudo-labels are empty."""
    run = tmp_path_factory.mktemp("newborn")
    cfg = supervised_tiny(_m(smoke_corpus, "labeled"), None, max_updates=15, save_every=15, log_every=15)
    return run_supervised(cfg, str(run)).last_checkpoint


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_finetune_continues_the_multilingual_model_on_one_language(smoke_corpus, teacher, tmp_path):
    cfg = finetune_tiny("SL", _m(smoke_corpus, "labeled"), _m(smoke_corpus, "dev"), init_checkpoint=teacher,
                        max_updates=20, eval_every=20, save_every=10, log_every=10,
                        optim={"name": "adamw", "lr": 1e-3, "warmup_updates": 2, "schedule": "constant"})
    result = run_finetune(cfg, str(tmp_path))
    assert result.stage_dir.endswith("finetune/sl") and result.step == 20
    labeled_sl = [r for r in read_manifest(_m(smoke_corpus, "labeled"))[0] if r["language"] == "sl"]
    assert result.num_train_utterances == len(labeled_sl)  # only the language's rows
    assert set(result.dev_metrics) == {"sl", "all", "macro"}
    start, tuned = load_trained(teacher), load_trained(result.best_checkpoint)
    assert tuned.tokenizer.to_dict() == start.tokenizer.to_dict() and tuned.languages == start.languages
    changed = [not torch.equal(a, b) for a, b in zip(start.model.parameters(), tuned.model.parameters(), strict=True)]
    assert all(changed)  # every parameter moved from the multilingual starting point
    assert tuned.checkpoint["init_checkpoint"] == teacher


@pytest.mark.slow
def test_finetune_refuses_a_language_the_model_does_not_know(smoke_corpus, teacher, tmp_path):
    cfg = finetune_tiny("de", _m(smoke_corpus, "labeled"), None, init_checkpoint=teacher, max_updates=5)
    with pytest.raises(ValueError, match="not one of the checkpoint's languages"):
        run_finetune(cfg, str(tmp_path))


def test_slot_choice_is_uniform_and_relabels_with_probability_p():
    rng = random.Random(0)
    draws = [choose_slot(rng, 8, 0.1) for _ in range(20000)]
    relabels = sum(r for _, r in draws)
    assert abs(relabels - 2000) < 4 * (20000 * 0.1 * 0.9) ** 0.5  # binomial, 4 sd
    counts = [sum(s == k for s, _ in draws) for k in range(8)]
    assert max(counts) - min(counts) < 0.1 * 2500
    again = random.Random(0)
    assert [choose_slot(again, 8, 0.1) for _ in range(200)] == draws[:200]  # the seed fixes every choice
    other = random.Random(1)
    assert [choose_slot(other, 8, 0.1) for _ in range(200)] != draws[:200]


def test_each_cycle_has_one_labeled_step_and_lambda_unlabeled_in_shuffled_order():
    lam = 4
    kinds = [is_labeled_step(i, lam, seed=3) for i in range(5 * 200)]
    cycles = [kinds[i : i + 5] for i in range(0, len(kinds), 5)]
    assert all(sum(c) == 1 for c in cycles)
    positions = {c.index(True) for c in cycles}
    assert positions == set(range(5))  # the labeled step moves around within its cycle


@pytest.mark.slow
def test_cache_fills_without_updates_then_trains_and_relabels(smoke_corpus, teacher, tmp_path):
    cfg = tiny_slimipl(smoke_corpus, teacher, max_updates=24, pl_cache_update_prob=0.5)
    result = run_slimipl(cfg, str(tmp_path))
    history = _jsonl(tmp_path / "slimipl/sl/metrics.jsonl")
    refreshes = _jsonl(tmp_path / "slimipl/sl/pl_metrics.jsonl")
    fills = [r for r in refreshes if r["phase"] == "fill"]
    assert len(fills) == cfg.pl_cache_size
    first_pl = next(h["step"] for h in history if h["kind"] == "pl")
    # While the cache fills no PL update happens: every update up to then is a labeled one.
    assert all(h["kind"] == "labeled" for h in history if h["step"] < first_pl)
    assert first_pl > fills[-1]["step"]
    pl_updates = [h for h in history if h["kind"] == "pl"]
    relabels = [r for r in refreshes if r["phase"] == "relabel"]
    assert 0 < len(relabels) < len(pl_updates)  # p = 0.5
    assert result.extra["refreshes"] == len(refreshes) == cfg.pl_cache_size + len(relabels)
    # λ = 2: over the PL phase, two unlabeled steps (fill or PL update) per labeled update.
    labeled_after = sum(h["kind"] == "labeled" for h in history)
    unlabeled_steps = len(pl_updates) + len(fills)
    assert abs(unlabeled_steps - cfg.unlabeled_ratio * labeled_after) <= cfg.unlabeled_ratio
    assert all(r["cropped"] == (r["step"] < cfg.cropping_warmup_updates) for r in refreshes)
    assert "pl_cer" in refreshes[0]  # measured against the hidden references
    ev = result.extra["pl_eval"]
    for when in ("start", "end"):
        for how in ("whole", "crop"):
            assert 0 <= ev[when][how]["empty_share"] <= 1 and ev[when][how]["pl_cer"] >= 0


@pytest.mark.slow
def test_pseudo_labels_are_made_in_eval_mode_without_specaugment(smoke_corpus, teacher):
    from pipeline.data.stream import LazyBatchLoader, load_unlabeled

    trained = load_trained(teacher)
    model = trained.model
    model.set_dropout(0.3)
    model.train()
    utts, _ = load_unlabeled(_m(smoke_corpus, "unlabeled"), features=trained.features, policy=trained.audio_policy,
                             language="sl")
    loader = LazyBatchLoader(utts[:2], features=trained.features, policy=trained.audio_policy,
                             max_batch_duration_s=60.0, max_batch_size=2, num_buckets=1, seed=0, shuffle=False)
    batch = next(iter(loader.iter_epoch(0)))
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].clone())))
    common = dict(tokenizer=trained.tokenizer, languages=trained.languages, bf16=True)
    first = label_batch(model, batch, **common)
    second = label_batch(model, batch, **common)
    hook.remove()
    assert model.training  # back in train mode for the next update
    assert [s[0] for s in seen] == [False, False]  # no dropout, no layerdrop while labeling
    feats = torch.nn.utils.rnn.pad_sequence(batch.features, batch_first=True)
    # The features as decoded, padded to 64 frames (exact: padding is masked), with no SpecAugment mask.
    assert torch.equal(seen[0][1], pad_time_to_multiple(feats, PAD_FRAMES_MULTIPLE))
    assert [d["tokens"] for d in first] == [d["tokens"] for d in second]  # deterministic despite dropout 0.3
    loader.close()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_losses_and_cache(smoke_corpus, teacher, tmp_path):
    cfg = tiny_slimipl(smoke_corpus, teacher, max_updates=14, save_every=5, ema_decay=0.9)
    run_slimipl(cfg, str(tmp_path / "straight"))

    class Killed(Exception):
        pass

    def kill_at_8(done, total, desc):
        if desc.startswith("train") and done == 8:
            raise Killed

    with pytest.raises(Killed):
        run_slimipl(cfg, str(tmp_path / "killed"), on_progress=kill_at_8)  # last.pt holds update 5
    run_slimipl(cfg, str(tmp_path / "killed"))
    for name in ("metrics.jsonl", "pl_metrics.jsonl"):
        straight, killed = (_jsonl(tmp_path / run / "slimipl/sl" / name) for run in ("straight", "killed"))
        drop = ("grad_norm",)  # identical too, but float noise in the 4th decimal is not the point
        assert [{k: v for k, v in r.items() if k not in drop} for r in killed] == [
            {k: v for k, v in r.items() if k not in drop} for r in straight
        ]
    a, b = (torch.load(tmp_path / run / "slimipl/sl/checkpoints/last.pt", weights_only=True)
            for run in ("straight", "killed"))
    assert a["stage_state"]["cache"] == b["stage_state"]["cache"]  # same PLs in the same slot order
    assert a["stage_state"]["unlabeled"] == b["stage_state"]["unlabeled"]
    for k in a["stage_state"]["ema"]:
        torch.testing.assert_close(a["stage_state"]["ema"][k], b["stage_state"]["ema"][k])


@pytest.mark.slow
def test_the_collapse_guard_stops_a_run_whose_pseudo_labels_are_empty(smoke_corpus, newborn, tmp_path):
    cfg = tiny_slimipl(smoke_corpus, newborn, collapse={"patience": 3}, pl_cache_size=5)
    with pytest.raises(CollapseError) as err:
        run_slimipl(cfg, str(tmp_path))
    text = str(err.value)
    assert "3 cache refreshes in a row" in text and "empty PL share 1.00 > 0.5" in text
    assert "PL chars/s" in text and newborn in text  # the numbers and the last good checkpoint
    assert not (tmp_path / "slimipl/sl/checkpoints/last.pt").exists()  # nothing trained on collapsed PLs


@pytest.mark.slow
def test_the_collapse_guard_can_roll_back_instead(smoke_corpus, teacher, tmp_path, caplog):
    # Real PLs carry ≈ 10 chars/s; demanding 50 makes every refresh "bad". With patience 4 > N = 2 the guard
    # trips on a relabel of a full cache: it rolls back once (cache emptied, refilled), then stops.
    guard = {"min_chars_per_s": 50.0, "max_empty_share": 1.0, "max_blank_ratio": 1.0, "patience": 4,
             "action": "rollback", "max_rollbacks": 1}
    cfg = tiny_slimipl(smoke_corpus, teacher, collapse=guard, pl_cache_size=2, pl_cache_update_prob=1.0, max_updates=40)
    caplog.set_level(logging.INFO, logger="mlpl")
    with pytest.raises(CollapseError, match="collapse guard"):
        run_slimipl(cfg, str(tmp_path))
    assert "rolling back (1 of 1)" in caplog.text
    assert caplog.text.count("PL cache full") == 2  # filled, rolled back and emptied, filled again


@pytest.mark.slow
def test_bad_unlabeled_rows_become_rejects_while_the_rest_trains(smoke_corpus, teacher, tmp_path):
    rows, _ = read_manifest(_m(smoke_corpus, "unlabeled"))
    bad = {kind: {k: v for k, v in row.items() if k != "text"} | {"language": "sl"}
           for kind, row in bad_rows(tmp_path).items() if kind not in ("text is empty", "unknown language")}
    bad["unknown language"] = {"id": "xx1", "audio": rows[0]["audio"], "duration_s": 25.0, "language": "xx"}
    manifest = write_jsonl(tmp_path / "unlabeled.jsonl", rows + list(bad.values()))
    cfg = tiny_slimipl(smoke_corpus, teacher, unlabeled_manifest=manifest, max_updates=8)
    result = run_slimipl(cfg, str(tmp_path / "run"))
    assert result.step == 8
    rejects = {r["id"]: r["reason"] for r in read_manifest(str(tmp_path / "run/slimipl/sl/rejects.jsonl"))[0]}
    for kind, row in bad.items():
        assert kind in rejects[row["id"]], (kind, rejects.get(row["id"]))
