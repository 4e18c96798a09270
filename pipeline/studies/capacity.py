"""The capacity study (Li et al. 2021, "Scaling end-to-end models for large-scale multilingual ASR") on a built
corpus: supervised multilingual models that differ in one setting — depth against width at equal parameters,
transformer against Conformer, with and without language conditioning — and one model per language against one
multilingual model, each trained for the same training wall time on this machine and scored per language on the
test split. Four tables go into the results page's "Capacity study" section.

Equal compute: a short probe times each setting's updates (`train_wall_s`, updates only), and each run gets as
many updates as fit the budget, so its LR schedule runs to its end. The budget is the tiny preset's time for
`reference_updates` updates (the bench recipe's supervised stage: 1000).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ModelConfig, preset, supervised_tiny
from pipeline.engine.evaluate import run_evaluate
from pipeline.stages.supervised import run_supervised
from pipeline.studies.common import labeled_hours, write_section
from storage.files import exists, join, read_json, remove_tree, write_json
from storage.manifest import read_manifest, write_manifest

log = logging.getLogger("mlpl.capacity")

PROBE_WARMUP_UPDATES, PROBE_UPDATES = 10, 60  # the first updates pay one-off costs (kernel creation): not timed


@dataclass(frozen=True)
class CapacityRun:
    """One supervised model of the study: a model preset, changes to it, and the language it is limited to."""

    name: str
    model: str = "tiny"
    changes: dict[str, Any] = field(default_factory=dict)
    language: str | None = None  # a monolingual model of this language; None: every language

    def model_config(self) -> ModelConfig:
        """The run's model config: its preset with its changes."""
        return preset("model", self.model).model_copy(update=self.changes)


MULTILINGUAL = [
    CapacityRun("tiny"),
    CapacityRun("tiny_deep_narrow", "tiny_deep_narrow"),
    CapacityRun("tiny_wide_shallow", "tiny_wide_shallow"),
    CapacityRun("tiny_conformer", "tiny_conformer"),
    CapacityRun("tiny_language_conditioned", changes={"language_conditioning": True}),
]

# (section title, what it compares, the runs in the table's order)
TABLES = [
    ("a. Depth against width at equal parameters", "the same 1.2 M parameters as 2, 4 or 12 layers",
     ["tiny_wide_shallow", "tiny", "tiny_deep_narrow"]),
    ("b. Transformer against Conformer at equal parameters", "4 transformer layers against 2 Conformer layers of the "
     "same width (1.2 M parameters each)", ["tiny", "tiny_conformer"]),
    ("c. Language conditioning", "a learned language embedding added to the encoder input (language from the "
     "manifest; hidden in 10 % of training utterances so that \"unknown\" works)",
     ["tiny", "tiny_language_conditioned"]),
]


def monolingual_runs(languages: list[str]) -> list[CapacityRun]:
    """One tiny model per language."""
    return [CapacityRun(f"mono_{lang}", language=lang) for lang in languages]


@dataclass
class CapacityStudy:
    """Where the study reads its corpus and keeps its runs, and its compute budget."""

    corpus_dir: str
    out_dir: str
    reference_updates: int = 1000
    eval_count: int = 4  # dev evaluations per run (the best checkpoint by dev CER is scored on test)
    probe: Callable[[CapacityRun], float] | None = None  # seconds per update; default: a timed probe run

    def manifest(self, split: str, language: str | None = None) -> str:
        """The split's manifest, or one language's rows of it (written once into the study folder)."""
        url = join(self.corpus_dir, "manifests", f"{split}.jsonl")
        if language is None:
            return url
        out = join(self.out_dir, "manifests", f"{split}-{language}.jsonl")
        if not exists(out):
            rows, _ = read_manifest(url)
            write_manifest(out, [r for r in rows if r.get("language") == language])
        return out

    def languages(self) -> list[str]:
        """The corpus' labeled languages, sorted."""
        rows, _ = read_manifest(self.manifest("labeled"))
        return sorted({r["language"] for r in rows})

    def labeled_hours(self) -> dict[str, float]:
        """Labeled audio per language, in hours."""
        return labeled_hours(self.manifest("labeled"))

    def config(self, run: CapacityRun, max_updates: int):
        """The run's supervised config: the tiny training preset with the run's model and data."""
        every = max(1, max_updates // self.eval_count)
        return supervised_tiny(self.manifest("labeled", run.language), self.manifest("dev", run.language),
                               model=run.model_config(), max_updates=max_updates, eval_every=every, save_every=every,
                               log_every=max(1, max_updates // 10))

    def seconds_per_update(self, run: CapacityRun) -> float:
        """Training seconds per update of the run's setting: `PROBE_UPDATES` updates timed after
        `PROBE_WARMUP_UPDATES` untimed ones (kept in the study folder)."""
        if self.probe is not None:
            return self.probe(run)
        record = join(self.out_dir, "probes", f"{run.name}.json")
        if exists(record):
            return read_json(record)["s_per_update"]
        cfg, probe_dir = self.config(run, PROBE_WARMUP_UPDATES + PROBE_UPDATES), join(self.out_dir, "probes", run.name)
        warm = run_supervised(cfg, probe_dir, resume=False, stop_after=PROBE_WARMUP_UPDATES)
        timed = run_supervised(cfg, probe_dir)  # resumes: train_wall_s adds up over both parts
        s = (timed.train_wall_s - warm.train_wall_s) / (timed.step - warm.step)
        write_json(record, {"s_per_update": s, "updates": timed.step - warm.step, "warmup_updates": warm.step})
        return s

    def budget_s(self) -> float:
        """Training seconds every run gets: the tiny preset's time for `reference_updates` updates."""
        return self.reference_updates * self.seconds_per_update(CapacityRun("tiny"))

    def updates_within(self, run: CapacityRun, budget_s: float) -> int:
        """How many of the run's updates fit the budget."""
        return max(1, round(budget_s / self.seconds_per_update(run)))

    def train_and_score(self, run: CapacityRun, updates: int) -> dict[str, Any]:
        """Train the run for `updates` (resumes; a finished run is reused) and score its best checkpoint on the
        test split: per-language CER, parameters, updates and training seconds."""
        run_dir = join(self.out_dir, "runs", run.name)
        result = run_supervised(self.config(run, updates), run_dir)
        scored = run_evaluate(result.best_checkpoint, self.manifest("test", run.language),
                              join(run_dir, "test-eval"), language=run.language)
        cer = {lang: m["cer"] for lang, m in scored["metrics"].items() if lang not in ("all", "macro")}
        figures = {"name": run.name, "model": run.model, "changes": run.changes, "language": run.language,
                   "parameters": result.num_parameters, "updates": result.step, "train_wall_s": result.train_wall_s,
                   "best_step": result.best.get("step"), "test_cer": cer}
        write_json(join(run_dir, "figures.json"), figures)
        return figures


def run_capacity_study(study: CapacityStudy, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Train and score every run of the study (or those named in `only`): {run name: figures}."""
    runs = MULTILINGUAL + monolingual_runs(study.languages())
    unknown = sorted(set(only or []) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"no capacity run named {', '.join(unknown)}; known: {', '.join(r.name for r in runs)}")
    chosen = [r for r in runs if only is None or r.name in only]
    record = join(study.out_dir, "capacity.json")
    done = read_json(record) if exists(record) else {}
    figures, rebalanced = done.get("runs", {}), done.get("rebalanced_updates", {})
    budget = done.get("budget_s") or study.budget_s()
    # Every probe before any training, so that they all time the same quiet machine; a count `rebalance` set stays.
    updates = {run.name: rebalanced.get(run.name) or study.updates_within(run, budget) for run in chosen}
    log.info("capacity study: %.0f s of training per run (%d tiny updates): %s", budget, study.reference_updates,
             ", ".join(f"{name} {n}" for name, n in updates.items()))
    for i, run in enumerate(chosen):
        log.info("capacity run %s (%d/%d): %d updates", run.name, i + 1, len(chosen), updates[run.name])
        figures[run.name] = study.train_and_score(run, updates[run.name])
        # After each run, so that an interrupted study shows what it has.
        _save(record, budget, figures, rebalanced)
    return {name: figures[name] for name in updates}


def rebalance(study: CapacityStudy, tolerance: float = 0.1) -> list[str]:
    """The second pass: a 60-update probe misses a run's own training time by up to ≈ ±20 %, so every finished run
    whose time is more than `tolerance` off the tiny run's own is trained again from scratch, with the update count
    its own measured rate gives for the tiny run's time (which becomes the budget). The names retrained."""
    record = join(study.out_dir, "capacity.json")
    done = read_json(record)
    figures, rebalanced = done["runs"], done.get("rebalanced_updates", {})
    target = figures["tiny"]["train_wall_s"]
    by_name = {r.name: r for r in MULTILINGUAL + monolingual_runs(study.languages())}
    retrained = []
    for name, f in sorted(figures.items()):
        if name == "tiny" or abs(f["train_wall_s"] / target - 1) <= tolerance:
            continue
        updates = max(1, round(target * f["updates"] / f["train_wall_s"]))
        log.info("rebalance %s: %.0f s for %d updates against tiny's %.0f s: again with %d", name,
                 f["train_wall_s"], f["updates"], target, updates)
        remove_tree(join(study.out_dir, "runs", name))
        rebalanced[name] = updates
        _save(record, target, figures, rebalanced)
        figures[name] = study.train_and_score(by_name[name], updates)
        retrained.append(name)
    _save(record, target, figures, rebalanced)
    return retrained


def _save(record: str, budget_s: float, figures: dict[str, Any], rebalanced: dict[str, int]) -> None:
    """The study's record: the budget, every finished run's figures, the update counts `rebalance` set."""
    write_json(record, {"budget_s": budget_s, "runs": figures, "rebalanced_updates": rebalanced})


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _shape(run: dict[str, Any]) -> str:
    cfg = preset("model", run["model"]).model_copy(update=run["changes"])
    return f"{cfg.encoder} {cfg.n_layers} × d {cfg.d_model}, FFN {cfg.ffn_dim}"


def _setting_table(runs: list[dict[str, Any]], languages: list[str]) -> list[str]:
    """Rows of settings against per-language test CER; the lowest average is marked."""
    best = min(runs, key=lambda r: _mean(list(r["test_cer"].values())))
    lines = ["| setting | shape | params | updates | train s | " + " | ".join(languages) + " | avg |",
             "|---|---|---:|---:|---:|" + "---:|" * (len(languages) + 1)]
    for r in runs:
        avg = _mean([r["test_cer"][lang] for lang in languages])
        mark = "**" if r is best else ""
        cells = " | ".join(f"{r['test_cer'][lang]:.1f}" for lang in languages)
        lines.append(f"| {mark}{r['name']}{mark} | {_shape(r)} | {r['parameters'] / 1e6:.2f} M | {r['updates']} | "
                     f"{r['train_wall_s']:.0f} | {cells} | {mark}{avg:.1f}{mark} |")
    others = [r for r in runs if r is not best]
    best_avg = _mean(list(best["test_cer"].values()))
    margins = ", ".join(f"{r['name']} {_mean(list(r['test_cer'].values())) - best_avg:+.1f}" for r in others)
    seconds = [r["train_wall_s"] for r in runs]
    lines += ["", f"Won: **{best['name']}** (lowest average test CER; the others: {margins} points). Training time "
              f"{min(seconds):.0f}-{max(seconds):.0f} s, the winner's {best['train_wall_s']:.0f} s."]
    return lines


def _capacity_table(multi: dict[str, Any], mono: dict[str, dict[str, Any]], hours: dict[str, float]) -> list[str]:
    """Per language: labeled hours, its own model's CER, the shared model's, and the change."""
    lines = ["| language | labeled h | one model per language | one multilingual model | change |",
             "|---|---:|---:|---:|---:|"]
    worse = []
    for lang in sorted(mono, key=lambda x: -hours.get(x, 0.0)):
        own, shared = mono[lang]["test_cer"][lang], multi["test_cer"][lang]
        change = (shared - own) / own * 100
        if shared > own:
            worse.append(lang)
        lines.append(f"| {lang} | {hours.get(lang, 0.0):.2f} | {own:.1f} | {shared:.1f} | {change:+.1f} % |")
    # High-resource: at least half the labeled audio of the best-resourced language; low-resource: the rest.
    most = max(hours.get(x, 0.0) for x in mono)
    high = sorted(x for x in mono if hours.get(x, 0.0) >= most / 2)
    low = sorted(x for x in mono if hours.get(x, 0.0) < most / 2)
    change = lambda langs: _mean([(multi["test_cer"][x] - mono[x]["test_cer"][x]) / mono[x]["test_cer"][x] * 100  # noqa: E731
                                  for x in langs])
    holds = bool(high and low) and change(high) > 0 and change(high) > change(low)
    lines += ["", f"Worse in the multilingual model: {', '.join(sorted(worse)) or 'none'}. Mean change "
              f"{change(high):+.1f} % for the high-resource languages ({', '.join(high)}: at least half the "
              f"labeled audio of the best-resourced one), {change(low):+.1f} % for the low-resource ones "
              f"({', '.join(low) or 'none'}). Li et al.'s finding — high-resource languages regress in one shared "
              "model for lack of capacity, low-resource ones less or not at all — "
              + ("holds here in direction." if holds else "does not hold here.")]
    return lines


def capacity_markdown(figures: dict[str, dict[str, Any]], budget_s: float, hours: dict[str, float],
                      command: str, machine: str) -> str:
    """The study's four tables (settings that have not finished are left out, and said to be)."""
    multi = {n: f for n, f in figures.items() if f["language"] is None}
    languages = sorted(next(iter(multi.values()))["test_cer"]) if multi else []
    out = [f"Supervised multilingual models on the bench corpus, each trained for the same {budget_s:.0f} s of "
           f"training (updates only; the tiny preset's time for 1000 updates, the bench recipe's supervised stage) "
           f"on {machine}, 2 cores; the best checkpoint by dev CER scored on test (CER %). One run each: the recipe "
           "runs differed by ≈ 1 % between reruns (Ablations). Each setting's update count comes from timing 60 of its "
           "updates after 10 untimed ones; a run whose own training time then missed the tiny run's by more than "
           "10 % was trained again with the count its own rate gives (column \"train s\": what each took). Command: `"
           + command + "` (a rerun resumes; finished runs are reused).", ""]
    for title, what, names in TABLES:
        out += [f"### {title}", "", what[0].upper() + what[1:] + ".", ""]
        runs = [multi[n] for n in names if n in multi]
        out += _setting_table(runs, languages) if len(runs) == len(names) else ["(not finished)"]
        out.append("")
    out += ["### d. One model per language against one multilingual model", "",
            "The tiny preset once per language (each the whole budget, so six times the multilingual model's "
            "compute in all, and each language sees about six times the updates it gets in the shared model) "
            "against the one tiny model shared by all six: capacity and compute both differ.", ""]
    mono = {f["language"]: f for f in figures.values() if f["language"] is not None}
    if "tiny" in multi and len(mono) == len(languages) and languages:
        out += _capacity_table(multi["tiny"], mono, hours)
    else:
        out.append("(not finished)")
    return "\n".join(out) + "\n"


def publish_capacity(study: CapacityStudy, results: str | None, command: str, machine: str) -> str:
    """The study's tables from its finished runs, written into the results page's "Capacity study" section."""
    record = read_json(join(study.out_dir, "capacity.json"))
    table = capacity_markdown(record["runs"], record["budget_s"], study.labeled_hours(), command, machine)
    return write_section(results, "Capacity study", table)
