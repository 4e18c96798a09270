"""The pseudo-label corpus written in other toolkits' layouts, streamed (`mlpl export <format>`).

Each format module has a writer with `write(row, flac)` (one PL row as a dict of native values, and the 16 kHz
mono 16-bit FLAC of its clip as stored in the PL shard), `commit() -> dict` (makes the export visible; returns
the files it wrote, relative to the output folder) and `abort()`. `pipeline/corpus/exporting.py` applies the
read-time filters, reads each PL shard once and hands the writer one sample at a time, so memory stays flat.

What each format writes under the output folder:

- `nemo` (`nemo.py`): a NeMo tarred dataset, `audio_<N>.tar` (one per PL shard, members `<key>.flac`) and
  `tarred_audio_manifest.json` (JSON lines: `audio_filepath` = member name, `duration`, `text`, `lang`,
  `shard_id`, and the PL fields). The FLAC bytes are copied byte for byte.
- `lhotse` (`lhotse_cuts.py`): `cuts.jsonl.gz`, one `MonoCut` per row with one `SupervisionSegment`, whose
  recordings are `audio/<lang>/<key>.flac` (bytes copied byte for byte, absolute paths). With `shar`, also a Lhotse
  Shar folder `shar/` written by lhotse's `CutSet.to_shar`: lhotse decodes each clip and encodes FLAC again, so
  its tars hold the same samples but not the same bytes (lhotse has no way to store the original encoding).
- `hf` (`huggingface.py`): Parquet in the Hub layout, `data/train-<i>-of-<n>.parquet`, with the `datasets`
  features in the schema metadata (`audio` is an `Audio(sampling_rate=16000)` column whose bytes are the FLAC,
  byte for byte), so `datasets.load_dataset("parquet", data_dir=out)` gives the Audio feature back.

Every file is written under a temp name and renamed whole (the Shar folder excepted: lhotse writes it); a rerun
into the same folder replaces the earlier export of that format (its extra tars, Parquet files or Shar shards are
removed; FLAC files under `audio/` of rows no longer exported stay).
"""

from __future__ import annotations

import io
from typing import Any, Protocol

SAMPLING_RATE = 16_000  # PL shards hold 16 kHz mono 16-bit FLAC (storage/pl.py)
LABEL_FIELDS = ("confidence", "lid_pred", "lid_prob", "teacher", "num_tokens")  # PL fields every format keeps


class ExportWriter(Protocol):
    """What `pipeline/corpus/exporting.py` needs of a format's writer."""

    def write(self, row: dict[str, Any], flac: bytes) -> None:
        """Add one PL row and its clip."""

    def commit(self) -> dict[str, Any]:
        """Make the export visible; return {"files": [paths relative to the output folder], ...}."""

    def abort(self) -> None:
        """Drop what is not yet visible (an error half-way)."""


def flac_frames(flac: bytes) -> int:
    """The number of samples of a FLAC clip, read from its header (nothing decoded)."""
    import soundfile

    return soundfile.info(io.BytesIO(flac)).frames


def label_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The PL fields of a row that every format keeps beside the text (`LABEL_FIELDS`)."""
    return {name: row.get(name) for name in LABEL_FIELDS}
