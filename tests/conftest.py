"""Shared fixtures: the `smoke` corpus is built once per test session (seconds with a warm text cache)."""

from __future__ import annotations

import pytest

from pipeline.corpus import build_corpus, corpus_preset


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory) -> str:
    """Path of a freshly built `smoke` corpus (es, el, sl)."""
    out = tmp_path_factory.mktemp("smoke-corpus")
    build_corpus(corpus_preset("smoke"), str(out))
    return str(out)
