"""Bring your corpus, take your pseudo-labels: each source layout's miniature is imported, a tiny model trains a few
updates on it and labels it, and every export reads back through its own library with the PL table's ids, texts
and audio samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import label_tiny, supervised_tiny
from pipeline.corpus.exporting import export_pseudo_labels
from pipeline.corpus.importing import import_corpus
from pipeline.stages.label import run_label
from pipeline.stages.supervised import run_supervised
from storage.pl import load_pseudo_labels, pl_audio
from tests.helpers.export_readers import read_hf, read_lhotse, read_nemo, samples
from tests.helpers.sources_cv_voxpopuli import make_common_voice, make_voxpopuli
from tests.helpers.sources_lhotse import make_lhotse_cuts, make_lhotse_manifests, make_lhotse_shar
from tests.helpers.sources_nemo_hf import make_hf_parquet, make_nemo, make_nemo_tarred

SOURCES = {
    "common-voice": (make_common_voice, {}),
    "voxpopuli": (make_voxpopuli, {}),
    "lhotse-manifests": (make_lhotse_manifests, {"language": "de"}),
    "lhotse-cuts": (make_lhotse_cuts, {"language": "de"}),
    "lhotse-shar": (make_lhotse_shar, {"language": "de"}),
    "nemo": (make_nemo, {}),
    "nemo-tarred": (make_nemo_tarred, {}),
    "hf": (make_hf_parquet, {}),
}


def _format(source: str) -> str:
    return "lhotse" if source.startswith("lhotse") else source


@pytest.mark.parametrize("source", [pytest.param(s, marks=[] if s == "common-voice" else pytest.mark.slow)
                                    for s in SOURCES])
def test_import_train_label_export_and_read_back(source, tmp_path):
    make, options = SOURCES[source]
    corpus = tmp_path / "corpus"
    summary = import_corpus(_format(source), str(make(tmp_path / "src")), str(corpus), options=options)
    manifests = summary["manifests"]
    assert "labeled" in manifests
    cfg = supervised_tiny(manifests["labeled"], None, max_updates=3, save_every=3, log_every=3)
    trained = run_supervised(cfg, str(tmp_path / "run"))
    # (a synthesized clip may be too short for its text: the stage rejects it with that reason, as any stage would)
    assert trained.step == 3 and trained.num_train_utterances >= 3 and all(map(math.isfinite, trained.losses))
    # The unlabeled split where the source has one, else the labeled clips (their texts unused): a model of three
    # updates mostly says nothing, so empty PLs are kept (min_tokens 0) to give the exports rows.
    manifest = manifests.get("unlabeled", manifests["labeled"])
    languages = sorted({lang for langs in summary["splits"].values() for lang in langs})
    labels = str(tmp_path / "labels")
    run_label(label_tiny(manifest, {lang: trained.last_checkpoint for lang in languages},
                         filters={"min_tokens": 0}), labels)
    table = load_pseudo_labels(labels).set_index("id")
    assert len(table) > 0
    want = {i: (row.text, samples(pl_audio(labels, row))) for i, row in table.iterrows()}
    reads = {}
    for fmt in ("nemo", "lhotse", "hf"):
        out = tmp_path / "export" / fmt
        export_pseudo_labels(fmt, labels, str(out), shar=fmt == "lhotse")
        if fmt == "nemo":
            reads["nemo"] = read_nemo(out)
        elif fmt == "lhotse":
            reads["lhotse"], reads["shar"] = read_lhotse(out), read_lhotse(out, shar=True)
        else:
            reads["hf"] = read_hf(out, tmp_path / "hf-cache")
    for client, got in reads.items():
        assert set(got) == set(want), client
        for uid, (text, audio) in want.items():
            assert got[uid][0] == text, (client, uid)
            np.testing.assert_array_equal(got[uid][1], audio, err_msg=f"{client} {uid}")
    assert Path(corpus / "import.json").exists()
