"""Each export read back by its own library, as {id: (text, samples)}: NeMo by plain JSON + tar, lhotse by
`CutSet.from_file` / `CutSet.from_shar`, Hugging Face by `datasets.load_dataset`."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf

Read = dict[str, tuple[str, np.ndarray]]


def samples(data: bytes, dtype: str = "int16") -> np.ndarray:
    """The samples of encoded 16 kHz audio bytes."""
    audio, rate = sf.read(io.BytesIO(data), dtype=dtype)
    assert rate == 16_000
    return audio


def nemo_members(out: Path) -> dict[str, tuple[dict, bytes]]:
    """NeMo's view of a tarred dataset: each manifest line with the bytes of its member in `audio_<shard_id>.tar`."""
    lines = [json.loads(x) for x in (out / "tarred_audio_manifest.json").read_text("utf-8").splitlines() if x]
    got = {}
    for line in lines:
        with tarfile.open(out / f"audio_{line['shard_id']}.tar") as tar:
            got[line["id"]] = (line, tar.extractfile(line["audio_filepath"]).read())
    return got


def read_nemo(out: Path) -> Read:
    """A NeMo tarred dataset as {id: (text, samples)}."""
    return {uid: (line["text"], samples(data)) for uid, (line, data) in nemo_members(out).items()}


def read_lhotse(out: Path, shar: bool = False) -> Read:
    """A lhotse CutSet (`cuts.jsonl.gz`) or its Shar folder."""
    from lhotse import CutSet

    cuts = CutSet.from_shar(in_dir=out / "shar") if shar else CutSet.from_file(out / "cuts.jsonl.gz")
    got: Read = {}
    for cut in cuts:
        sup = cut.supervisions[0]
        audio = np.round(cut.load_audio()[0] * 32768).astype(np.int16)
        got[sup.custom.get("pl_id", sup.id) if sup.custom else sup.id] = (sup.text, audio)
    return got


def read_hf(out: Path, cache: Path) -> Read:
    """A Hugging Face Parquet dataset through `load_dataset` (audio bytes decoded with soundfile)."""
    import datasets

    os.environ["HF_HUB_OFFLINE"] = "1"
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(cache))
    assert isinstance(ds.features["audio"], datasets.Audio)
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    return {r["id"]: (r["text"], samples(r["audio"]["bytes"])) for r in ds}
