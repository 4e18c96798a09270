"""Shared fixtures: the `smoke` corpus is built once per test session (seconds with a warm text cache)."""

from __future__ import annotations

import pytest

from pipeline.config import label_tiny, supervised_tiny
from pipeline.corpus.build import build_corpus, corpus_preset
from pipeline.stages.label import run_label
from pipeline.stages.supervised import run_supervised


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory) -> str:
    """Path of a freshly built `smoke` corpus (es, el, sl)."""
    out = tmp_path_factory.mktemp("smoke-corpus")
    build_corpus(corpus_preset("smoke"), str(out))
    return str(out)


@pytest.fixture(scope="session")
def teacher(smoke_corpus, tmp_path_factory) -> str:
    """A multilingual smoke model good enough to make non-empty pseudo-labels (es, el, sl)."""
    run = tmp_path_factory.mktemp("teacher")
    cfg = supervised_tiny(f"{smoke_corpus}/manifests/labeled.jsonl", None, max_updates=250, save_every=250,
                          log_every=125)
    return run_supervised(cfg, str(run)).last_checkpoint


@pytest.fixture(scope="session")
def labeled_root(smoke_corpus, teacher, tmp_path_factory) -> str:
    """The smoke corpus' unlabeled clips labeled once by `teacher`, uninterrupted, in units of 2 clips."""
    root = str(tmp_path_factory.mktemp("labels"))
    cfg = label_tiny(f"{smoke_corpus}/manifests/unlabeled.jsonl", {lang: teacher for lang in ("es", "el", "sl")},
                     unit_max_utterances=2)
    run_label(cfg, root)
    return root
