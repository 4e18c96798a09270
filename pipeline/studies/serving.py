"""The serving-size study (issue 20) on a built corpus: one finished multilingual model made smaller two ways, each
variant scored per language on the test split through its serving checkpoint (what `load_trained` rebuilds), with
that checkpoint's size on disk.

- Pruning (Yang et al., ASR pathways) at one sparsity: a dense control trained exactly as the pruned variants are
  (the same updates, batches and LR, no mask), one language-agnostic mask by IMP, and a pathway per language by IMP
  and by LTH (`pipeline/stages/prune.py`).
- Weights-only quantization (Rybakov et al.): float, and QAT at 8/4/2/1 bits (`pipeline/stages/quantize.py`).
Two tables go into the results page's "Serving-size students" section.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import preset, supervised_tiny
from pipeline.engine.evaluate import run_evaluate
from pipeline.stages.prune import run_prune
from pipeline.stages.quantize import run_quantize
from pipeline.stages.supervised import run_supervised
from pipeline.studies.common import labeled_hours, write_section
from storage.checkpoint import load_checkpoint, serialized_bytes
from storage.files import exists, join, read_json, size_of, write_json

log = logging.getLogger("mlpl.serving")

# (name, what it is, the prune config's fields); "dense" trains without masks (sparsity 0) as the others do.
PRUNE_RUNS = [
    ("dense", "no mask, trained as the pruned ones", {"method": "agnostic", "sparsity": 0.0}),
    ("agnostic-imp", "one mask for all languages, IMP", {"method": "agnostic", "mask_search": "imp"}),
    ("pathways-imp", "a pathway per language, IMP", {"method": "pathways", "mask_search": "imp"}),
    ("pathways-lth", "a pathway per language, LTH", {"method": "pathways", "mask_search": "lth"}),
]
QUANT_BITS = (8, 4, 2, 1)


@dataclass
class ServingStudy:
    """Where the study reads its corpus and keeps its runs; the model it starts from and its budgets."""

    corpus_dir: str
    out_dir: str
    init_checkpoint: str | None = None  # None: the tiny supervised preset trained here for `base_updates`
    base_updates: int = 1000  # the bench recipe's supervised stage
    sparsity: float = 0.706  # the paper's
    updates: int | None = None  # per variant after its mask search (None: the presets' 300)
    round_updates: int | None = None  # per IMP/LTH round and language (None: the preset's)

    def manifest(self, split: str) -> str:
        """The corpus' manifest of a split."""
        return join(self.corpus_dir, "manifests", f"{split}.jsonl")

    def base(self) -> str:
        """The model every variant starts from (trained once when not given)."""
        if self.init_checkpoint:
            return self.init_checkpoint
        cfg = supervised_tiny(self.manifest("labeled"), self.manifest("dev"), max_updates=self.base_updates,
                              eval_every=self.base_updates // 4, save_every=self.base_updates // 4)
        return run_supervised(cfg, join(self.out_dir, "base")).best_checkpoint

    def overrides(self) -> dict[str, Any]:
        """Budget fields every variant shares."""
        return {} if self.updates is None else {"max_updates": self.updates, "eval_every": max(1, self.updates // 3)}

    def score(self, name: str, checkpoint: str, **figures: Any) -> dict[str, Any]:
        """Test CER per language of a serving checkpoint, with its size on disk (kept in the study folder)."""
        scored = run_evaluate(checkpoint, self.manifest("test"), join(self.out_dir, "eval", name))
        cer = {lang: m["cer"] for lang, m in scored["metrics"].items() if lang not in ("all", "macro")}
        row = {"name": name, "checkpoint": checkpoint, "bytes": size_of(checkpoint), "test_cer": cer} | figures
        write_json(join(self.out_dir, "eval", name, "figures.json"), row)
        return row


def run_serving_study(study: ServingStudy) -> dict[str, Any]:
    """Train (or reuse) and score every variant: {"pruning": [rows], "quantization": [rows], ...}, saved to
    `serving.json` after each run so that an interrupted study shows what it has."""
    init = study.base()
    labeled, dev = study.manifest("labeled"), study.manifest("dev")
    record = join(study.out_dir, "serving.json")
    out: dict[str, Any] = {"init_checkpoint": init, "sparsity": study.sparsity, "pruning": [], "quantization": []}
    # Its size: the float32 weights alone (its checkpoint file also holds optimizer state).
    base = study.score("float", init, what="the start (no further training)",
                       bytes=serialized_bytes(load_checkpoint(init)["model"]))
    out["quantization"].append(base)
    for name, what, fields in PRUNE_RUNS:
        fields = {"sparsity": study.sparsity} | fields | study.overrides()
        if study.round_updates is not None:
            fields["round_updates"] = study.round_updates
        cfg = preset("prune", "tiny", init, labeled, dev, **fields)
        log.info("serving study: prune %s (%s)", name, what)
        result = run_prune(cfg, join(study.out_dir, "runs", name))
        out["pruning"].append(study.score(name, result.extra["packed_checkpoint"], what=what,
                                          sparsity=result.extra["sparsity"], updates=result.step,
                                          round_updates=cfg.round_updates, train_wall_s=result.train_wall_s,
                                          stage_wall_s=result.stage_wall_s))
        write_json(record, out)
    for bits in QUANT_BITS:
        cfg = preset("quantize", "tiny", init, labeled, dev, bits=bits, **study.overrides())
        log.info("serving study: quantize %d-bit", bits)
        result = run_quantize(cfg, join(study.out_dir, "runs", f"{bits}bit"))
        out["quantization"].append(study.score(f"{bits}-bit", result.extra["packed_checkpoint"], bits=bits,
                                               updates=result.step, train_wall_s=result.train_wall_s))
        write_json(record, out)
    return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _rows(rows: list[dict[str, Any]], languages: list[str], extra: Callable[[dict[str, Any]], str]) -> list[str]:
    lines = []
    for r in rows:
        cer = r["test_cer"]
        cells = " | ".join(f"{cer[lang]:.1f}" for lang in languages)
        lines.append(f"| {r['name']} | {extra(r)} | {cells} | {_mean([cer[x] for x in languages]):.1f} | "
                     f"{r['bytes'] / 1e6:.2f} MB |")
    return lines


def _low_resource(corpus_hours: dict[str, float]) -> str | None:
    """The language with the least labeled audio when it has under half the most's (the corpus' low-resource one)."""
    if not corpus_hours:
        return None
    low = min(corpus_hours, key=corpus_hours.get)
    return low if corpus_hours[low] < max(corpus_hours.values()) / 2 else None


def _who_suffers(rows: list[dict[str, Any]], ref: dict[str, Any], languages: list[str], low: str | None) -> str:
    """One sentence per variant: the low-resource language's relative CER change against the others' mean."""
    if low is None:
        return ""
    parts = []
    for r in rows:
        change = {x: (r["test_cer"][x] - ref["test_cer"][x]) / ref["test_cer"][x] * 100 for x in languages}
        others = _mean([change[x] for x in languages if x != low])
        verdict = "suffers more" if change[low] > others else "does not suffer more"
        parts.append(f"{r['name']} {change[low]:+.1f} % for {low} against {others:+.1f} % for the others ({low} "
                     f"{verdict})")
    return (f"Does the low-resource language ({low}) suffer more? Relative test CER change against {ref['name']}: "
            + "; ".join(parts) + ".")


def _avg(row: dict[str, Any], languages: list[str]) -> float:
    return _mean([row["test_cer"][x] for x in languages])


def _pathways_verdict(rows: list[dict[str, Any]], languages: list[str]) -> str:
    """Whether Yang et al.'s ordering holds: pathways below the dense model and below language-agnostic pruning."""
    by = {r["name"]: _avg(r, languages) for r in rows}
    if not {"dense", "agnostic-imp"} <= set(by):
        return ""
    parts = []
    for name in ("pathways-imp", "pathways-lth"):
        if name in by:
            vs_dense, vs_agnostic = (by[name] / by["dense"] - 1) * 100, (by[name] / by["agnostic-imp"] - 1) * 100
            holds = "holds" if vs_dense < 0 and vs_agnostic < 0 else "does not hold"
            parts.append(f"{name} {vs_dense:+.1f} % against dense and {vs_agnostic:+.1f} % against "
                         f"language-agnostic ({holds})")
    return ("Yang et al. report pathways 5 % below the dense model and 21 % below language-agnostic pruning (avg "
            "WER). Here, average test CER: " + "; ".join(parts) + ".")


def _bits_verdict(rows: list[dict[str, Any]], eight: dict[str, Any], languages: list[str]) -> str:
    """Each bit width's cost in CER points against 8-bit and its size against the float32 weights."""
    floats = next((r for r in rows if "bits" not in r), None)
    parts = [f"{r['bits']}-bit {_avg(r, languages) - _avg(eight, languages):+.1f} points"
             + (f", {floats['bytes'] / r['bytes']:.1f}× smaller" if floats else "")
             for r in rows if r.get("bits") in (4, 2, 1)]
    return ("Against the 8-bit control (the same updates at about float precision) and the float32 weights: "
            + "; ".join(parts) + ". Rybakov et al.: 1 bit +1.9 % absolute WER, 15.9× smaller (a model whose "
            "quantized layers are almost all of it; here the front end, heads and scales stay float).")


def serving_markdown(record: dict[str, Any], hours: dict[str, float], command: str, machine: str) -> str:
    """The study's two tables from its record."""
    rows = record["pruning"] + record["quantization"]
    if not rows:
        return "(not run yet)\n"
    languages = sorted(rows[0]["test_cer"])
    low = _low_resource(hours)
    header = " | ".join(languages)
    out = [f"One multilingual model (`{record['init_checkpoint']}`) made smaller, each variant's serving checkpoint "
           f"(what labeling and evaluation load) scored on the bench test split, CER % per language; size on disk "
           f"of that checkpoint. {machine}, 2 cores; one run each. Command: `{command}` (a rerun reuses finished "
           "runs).", ""]
    if record["pruning"]:
        p = record["pruning"][0]
        out += ["### Pruning: dense against language-agnostic against pathways (IMP, LTH)", "",
                f"8×1 blocks of every encoder linear weight at {100 * record['sparsity']:.1f} % sparsity per layer "
                f"(per pathway); mask search {p.get('round_updates')} updates per round (and per language for "
                f"pathways), 20 % of the remaining blocks per round, group lasso while searching; then "
                f"{p.get('updates')} updates from the model's weights under the masks, every batch one language "
                "(temperature mix) updating only its pathway. The dense row is the same training without a mask.",
                "", f"| variant | sparsity (union) | {header} | avg | checkpoint |",
                "|---|---|" + "---:|" * (len(languages) + 2)]

        def sparsity(r: dict[str, Any]) -> str:
            s = r.get("sparsity", {})
            if "union" in s:
                return f"{100 * _mean([v for k, v in s.items() if k != 'union']):.1f} % ({100 * s['union']:.1f} %)"
            return f"{100 * next(iter(s.values()), 0.0):.1f} %"

        out += _rows(record["pruning"], languages, sparsity)
        out += ["", _pathways_verdict(record["pruning"], languages), "",
                _who_suffers(record["pruning"][1:], record["pruning"][0], languages, low), ""]
    if record["quantization"]:
        q = next((r for r in record["quantization"] if "bits" in r), None)
        out += ["### Quantization: float against 8/4/2/1-bit weights", "",
                "Weights-only QAT of the encoder linear weights (absmean 1-bit; asymmetric min/max 2-8 bit; "
                f"sub-channel blocks of 64 input weights, or the largest divisor), {q['updates'] if q else '—'} "
                "updates each; the packed checkpoint holds the codes at the bit width and float16 scales (the float "
                "row: its float32 weights).", "",
                f"| weights | bits | {header} | avg | checkpoint |", "|---|---|" + "---:|" * (len(languages) + 2)]
        out += _rows(record["quantization"], languages, lambda r: str(r.get("bits", 32)))
        eight = next((r for r in record["quantization"] if r.get("bits") == 8), None)
        if eight is not None:
            lower = [r for r in record["quantization"] if r.get("bits") in (4, 2, 1)]
            out += ["", _bits_verdict(record["quantization"], eight, languages), "",
                    _who_suffers(lower, eight, languages, low)]
    return "\n".join(out) + "\n"


def publish_serving(study: ServingStudy, results: str | None, command: str, machine: str,
                    title: str = "Serving-size students") -> str:
    """The study's tables from its record, written into the results page's section `title`."""
    record = join(study.out_dir, "serving.json")
    table = serving_markdown(read_json(record) if exists(record) else {"pruning": [], "quantization": []},
                             labeled_hours(study.manifest("labeled")), command, machine)
    return write_section(results, title, table)
