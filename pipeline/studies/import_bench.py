"""`make bench`, importers: `mlpl import` of a generated Common Voice release at 1× and 10× the clips, each in a
fresh process, with its wall time and peak RSS (the importer streams, so memory must stay flat).

The source is a real Common Voice layout (release-17 TSV header, `clips/*.mp3`) whose clips are hard links to
one synthesized mp3: the import still opens and probes every clip's header, and building 10× costs seconds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from pipeline.studies.common import child_json

_HEADER = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
           "gender", "accents", "variant", "locale", "segment")

_CHILD = """
import json, sys
from pipeline.corpus.importing import import_corpus
summary = import_corpus("common-voice", sys.argv[1], sys.argv[2])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": summary["wall_s"], "peak_rss_mb": hwm / 1024, "rows": summary["rows_read"]}))
"""


def write_common_voice(folder: Path, clips: int, locale: str = "de") -> Path:
    """A Common Voice locale folder with `clips` clips (half train.tsv, half other.tsv), all links to one mp3."""
    base = folder / locale
    (base / "clips").mkdir(parents=True, exist_ok=True)
    t = np.arange(16000 * 2) / 16000
    one = base / "clips" / "source.mp3"
    sf.write(one, (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), 16000, format="MP3")
    lines = {"train": ["\t".join(_HEADER)], "other": ["\t".join(_HEADER)]}
    for i in range(clips):
        name = f"common_voice_{locale}_{i}.mp3"
        os.link(one, base / "clips" / name)
        split = "train" if i % 2 == 0 else "other"
        lines[split].append("\t".join((f"spk{i % 7}", name, str(i), f"satz nummer {i} mit \"zitat", "", "2", "0",
                                       "", "", "", "", locale, "")))
    for split, rows in lines.items():
        (base / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def run_import_bench(clips: int = 1000, scale: int = 10) -> dict[str, Any]:
    """Import a generated Common Voice release of `clips` and of `scale`× as many clips; wall time, rate, peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for n in (clips, clips * scale):
            src = write_common_voice(Path(tmp) / f"cv-{n}", n)
            runs[n] = child_json(_CHILD, str(src), str(Path(tmp) / f"out-{n}")) | {"clips": n}
    small, big = runs[clips], runs[clips * scale]
    return {"runs": [small, big], "scale": scale, "rss_ratio": big["peak_rss_mb"] / small["peak_rss_mb"]}


def format_import_bench(b: dict[str, Any]) -> str:
    """The import benchmark as a Markdown table with the memory ratio."""
    lines = ["| source (Common Voice layout) | rows | wall s | rows/s | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    for r in b["runs"]:
        rate = r["rows"] / max(r["wall_s"], 1e-9)
        lines.append(f"| {r['clips']} clips | {r['rows']} | {r['wall_s']:.1f} | {rate:.0f} | {r['peak_rss_mb']:.0f} |")
    lines.append(f"\nImport peak RSS at {b['scale']}× the source: {b['rss_ratio']:.3f}× (target ≤ 1.10×: streamed)")
    return "\n".join(lines)
