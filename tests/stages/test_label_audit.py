"""The dev audit: PL quality per confidence bucket measured on labeled dev rows labeled like the corpus, per-language
confidence thresholds read off it, and labeling with those thresholds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jiwer
import pandas as pd
import pytest
import torch

from pipeline.config import label_tiny
from pipeline.data.text import normalize_text
from pipeline.engine.evaluate import score
from pipeline.stages import label_audit
from pipeline.stages.label import plan_labeling, run_label
from pipeline.stages.label_audit import audit_dev, choose_thresholds
from pipeline.stages.label_decode import filter_reason
from storage.checkpoint import load_checkpoint, save_checkpoint
from storage.manifest import read_manifest
from storage.pl import load_pseudo_labels, load_rejects

LANGS = ("es", "el", "sl")


def _dev(corpus: str) -> str:
    return f"{corpus}/manifests/dev.jsonl"


def _cfg(corpus: str, teacher: str, manifest: str | None = None, **overrides):
    return label_tiny(manifest or f"{corpus}/manifests/unlabeled.jsonl", {lang: teacher for lang in LANGS},
                      **({"unit_max_utterances": 2} | overrides))


def _snapshot(root: str) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _refuse_to_decode(*args, **kwargs):
    raise AssertionError("the audit decoded although its cache matched")


@pytest.fixture(scope="module")
def audited(smoke_corpus, teacher, tmp_path_factory):
    """A plan over the smoke corpus' unlabeled rows and the audit of its dev rows, in a labels root of its own."""
    root = str(tmp_path_factory.mktemp("audited"))
    plan = plan_labeling(_cfg(smoke_corpus, teacher), root)
    return plan, audit_dev(plan, _dev(smoke_corpus))


def _assert_jiwer(stats: dict, rows: list[dict], refs: dict[str, str]) -> None:
    pairs = [(normalize_text(refs[r["id"]]), normalize_text(r["hypothesis"])) for r in rows]
    pairs = [p for p in pairs if p[0]]
    assert stats["n"] == len(rows)
    if not pairs:
        assert stats["cer"] is None and stats["wer"] is None
        return
    ref, hyp = [p[0] for p in pairs], [p[1] for p in pairs]
    assert stats["cer"] == pytest.approx(100 * jiwer.cer(reference=ref, hypothesis=hyp), abs=1e-9)
    assert stats["wer"] == pytest.approx(100 * jiwer.wer(reference=ref, hypothesis=hyp), abs=1e-9)


def test_bucket_cer_and_wer_are_jiwer_on_the_same_rows(audited, smoke_corpus):
    plan, audit = audited
    dev_rows, _ = read_manifest(_dev(smoke_corpus))
    refs = {r["id"]: r["text"] for r in dev_rows}
    assert set(audit["languages"]) == set(LANGS) and audit["edges"] == [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for lang, entry in audit["languages"].items():
        rows, _ = read_manifest(f"{plan.root}/{entry['rows_file']}")
        assert [r["id"] for r in rows] == [r["id"] for r in dev_rows if r["language"] == lang]  # all, in order
        assert entry["dev_rows"] == len(rows) > 0 and entry["unreadable"] == 0
        evaluated = score([r | {"language": lang, "reference": refs[r["id"]]} for r in rows])[lang]
        assert entry["all"]["cer"] == pytest.approx(evaluated["cer"]) and entry["all"]["wer"] == pytest.approx(
            evaluated["wer"])
        _assert_jiwer(entry["all"], rows, refs)
        kept = [r for r in rows if r["category"] is None]
        _assert_jiwer(entry["kept"], kept, refs)
        assert sum(b["n"] for b in entry["buckets"]) == len(kept)
        for b in entry["buckets"]:
            inside = [r for r in kept if b["lo"] <= r["confidence"] and (r["confidence"] < b["hi"] or b["hi"] == 1.0)]
            _assert_jiwer(b, inside, refs)
            _assert_jiwer(b["at_or_above"], [r for r in kept if r["confidence"] >= b["lo"]], refs)
            assert b["share"] == pytest.approx(len(inside) / len(kept))


def test_the_audit_decodes_dev_rows_exactly_as_labeling_does(audited, smoke_corpus, teacher, tmp_path):
    plan, audit = audited
    root = str(tmp_path / "labels")
    run_label(_cfg(smoke_corpus, teacher, _dev(smoke_corpus), unit_max_utterances=200), root)  # dev as a corpus
    labeled = pd.concat([load_pseudo_labels(root), load_rejects(root)]).set_index("id")
    for entry in audit["languages"].values():
        for r in read_manifest(f"{plan.root}/{entry['rows_file']}")[0]:
            got = labeled.loc[r["id"]]
            assert got["text"] == r["hypothesis"] and got["confidence"] == pytest.approx(r["confidence"])
            assert (None if pd.isna(got.get("category")) else got["category"]) == r["category"]


def test_thresholds_are_the_lowest_edge_whose_rows_at_or_above_meet_the_target():
    def lang(*cers):
        edges = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        return {"buckets": [{"lo": lo, "hi": hi, "at_or_above": {"n": 0 if c is None else 10, "cer": c}}
                            for lo, hi, c in zip(edges[:-1], edges[1:], cers, strict=True)]}

    audit = {"languages": {
        "es": lang(30.0, 20.0, 12.0, 9.0, 5.0, 2.0),  # falls below 10 % at 0.7
        "el": lang(8.0, 7.0, 6.0, 5.0, 4.0, 3.0),  # every row already meets it
        "sl": lang(30.0, 28.0, 25.0, 22.0, 20.0, 15.0),  # even the top bucket misses it
        "pt": lang(12.0, 9.0, 11.0, 10.0, 30.0, None),  # not monotone: 0.5 is the lowest edge that meets it
        "fr": lang(40.0, 30.0, 20.0, 15.0, 12.0, None),  # the top bucket is empty, the rest miss it
        "de": {"buckets": []},  # no dev rows
    }}
    assert choose_thresholds(audit, 10.0) == {"es": 0.7, "el": 0.0, "sl": None, "pt": 0.5, "fr": None, "de": None}
    assert choose_thresholds(audit, 9.0)["es"] == 0.7 and choose_thresholds(audit, 2.0)["es"] == 0.9  # ≤, not <


def test_a_rerun_reads_the_audit_and_a_new_teacher_re_audits_only_its_language(audited, smoke_corpus, teacher,
                                                                                tmp_path, monkeypatch):
    plan, audit = audited
    before = _snapshot(plan.root)
    with monkeypatch.context() as m:
        m.setattr(label_audit, "decode_clips", _refuse_to_decode)
        assert audit_dev(plan, _dev(smoke_corpus)) == audit
    assert _snapshot(plan.root) == before  # nothing rewritten
    # Another sl teacher (moved weights): only sl's dev rows are decoded again.
    ckpt = load_checkpoint(teacher)
    torch.manual_seed(0)
    ckpt["model"] = {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    ckpt["step"] = 251
    save_checkpoint(str(tmp_path / "teacher2.pt"), ckpt)
    root = tmp_path / "root"
    shutil.copytree(plan.root, root)
    cfg = _cfg(smoke_corpus, teacher)
    plan2 = plan_labeling(cfg.model_copy(update={"teachers": cfg.teachers | {"sl": str(tmp_path / "teacher2.pt")}}),
                          str(root))
    decoded = []
    real = label_audit.decode_clips
    monkeypatch.setattr(label_audit, "decode_clips", lambda p, lang, *a: decoded.append(lang) or real(p, lang, *a))
    audit2 = audit_dev(plan2, _dev(smoke_corpus))
    assert decoded == ["sl"]
    assert {k: audit2["languages"][k] for k in ("es", "el")} == {k: audit["languages"][k] for k in ("es", "el")}
    assert audit2["languages"]["sl"]["key"] != audit["languages"]["sl"]["key"]
    assert audit2["languages"]["sl"]["teacher"].startswith("supervised@251:")


def test_per_language_thresholds_reject_exactly_the_rows_below_them_and_relabel_only_their_language(
        smoke_corpus, teacher, labeled_root, tmp_path):
    base = load_pseudo_labels(labeled_root)  # the same rows labeled without thresholds
    sl = base[base.language == "sl"]
    t = float(sl["confidence"].median())
    root = str(tmp_path / "labels")
    run_label(_cfg(smoke_corpus, teacher, min_confidence_by_language={"sl": t}), root)
    low = load_rejects(root).query("category == 'low_confidence'")
    below = set(sl[sl.confidence < t]["id"])
    assert below and set(low["id"]) == below
    assert low["reason"].str.contains(f"min_confidence_by_language['sl']={t} (set in the config)", regex=False).all()
    assert set(load_pseudo_labels(root)["id"]) == set(base["id"]) - below
    # A new sl threshold relabels sl's three units only; then one for es relabels es's one unit only.
    result = run_label(_cfg(smoke_corpus, teacher, min_confidence_by_language={"sl": float(sl.confidence.min())}), root)
    assert (result.units_labeled, result.units_skipped) == (3, 2)
    assert set(load_pseudo_labels(root)["id"]) == set(base["id"])  # the lowest confidence rejects nothing
    before = _snapshot(root)
    result = run_label(_cfg(smoke_corpus, teacher, min_confidence_by_language={"sl": float(sl.confidence.min()),
                                                                                "es": 0.5}), root)
    assert (result.units_labeled, result.units_skipped) == (1, 4)
    changed = {k for k, v in _snapshot(root).items() if before.get(k) != v and k.startswith(("pl/", "shards/"))}
    assert changed == {"pl/es/part-000000.parquet", "shards/pl-es-000000.tar"}


def _target_above_the_lowest_edge(audit: dict) -> float:
    """A dev CER that some language reaches only above confidence 0, so the audit must pick a real threshold."""
    for entry in audit["languages"].values():
        first = entry["buckets"][0]["at_or_above"]["cer"]
        better = [b["at_or_above"]["cer"] for b in entry["buckets"][1:]
                  if b["at_or_above"]["n"] and b["at_or_above"]["cer"] is not None and b["at_or_above"]["cer"] < first]
        if better:
            return min(better)
    raise AssertionError(f"confidence does not rank the teacher's dev PLs at all: {audit}")


def test_thresholds_chosen_from_the_dev_audit_are_applied_published_and_cached(audited, smoke_corpus, teacher,
                                                                                labeled_root, tmp_path, monkeypatch):
    _, audit = audited
    target = _target_above_the_lowest_edge(audit)
    chosen = choose_thresholds(audit, target)
    assert any(chosen.values())
    root = str(tmp_path / "labels")
    cfg = _cfg(smoke_corpus, teacher, audit_manifest=_dev(smoke_corpus), audit_max_dev_cer=target)
    result = run_label(cfg, root)
    assert json.loads(Path(root, "audit.json").read_text())["languages"] == audit["languages"]
    base = load_pseudo_labels(labeled_root)
    low = load_rejects(root).query("category == 'low_confidence'")
    below = {i for lang, t in chosen.items() if t for i in base[(base.language == lang) & (base.confidence < t)]["id"]}
    assert set(low["id"]) == below
    assert low["reason"].str.contains("chosen from the dev audit of").all()
    summary = json.loads(Path(root, "summary.json").read_text())
    for lang, t in chosen.items():
        a = summary[lang]["dev_audit"]
        assert a["file"] == "audit.json" and a["threshold"] == t and a["max_dev_cer"] == target
        assert a["threshold_from"] == (None if t is None else "dev audit") and a["buckets"] == result.summary[lang][
            "dev_audit"]["buckets"]
        if t:
            assert a["at_threshold"]["cer"] <= target
    markdown = Path(root, "summary.md").read_text()
    assert "Dev audit: expected PL quality" in markdown and f"(dev audit: CER ≤ {target:g}%)" in markdown
    # A rerun decodes nothing (neither dev nor units) and rewrites no file.
    before = _snapshot(root)
    monkeypatch.setattr(label_audit, "decode_clips", _refuse_to_decode)
    result = run_label(cfg, root)
    assert result.units_labeled == 0 and _snapshot(root) == before
    # A PL just under a chosen threshold is a reject that names the threshold and the audit it came from.
    plan = plan_labeling(cfg, root)
    lang, t = next((lang, t) for lang, t in chosen.items() if t)
    assert plan.cfg.min_confidence_by_language == {k: v for k, v in chosen.items() if v is not None}
    pl = {"num_tokens": 5, "confidence": t - 0.01, "lid_pred": lang, "lid_prob": 0.9}
    category, reason = filter_reason(pl, lang, plan.cfg, plan.threshold_notes[lang])
    assert category == "low_confidence" and f"min_confidence_by_language[{lang!r}]={t}" in reason
    assert f"chosen from the dev audit of {_dev(smoke_corpus)}" in reason and f"{target:g}%" in reason
    assert filter_reason(pl | {"confidence": t}, lang, plan.cfg, plan.threshold_notes[lang]) is None


def test_a_max_dev_cer_without_an_audit_manifest_is_refused_with_the_fix(smoke_corpus, teacher, tmp_path):
    with pytest.raises(ValueError, match="set audit_manifest"):
        plan_labeling(_cfg(smoke_corpus, teacher, audit_max_dev_cer=10.0), str(tmp_path / "labels"))
