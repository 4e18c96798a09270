"""PL rows as a Lhotse CutSet: `cuts.jsonl.gz` over `audio/<lang>/<key>.flac`, and optionally a Shar folder.

One `MonoCut` per row (id = the PL id, or its sample key where the id is not safe in a file name; the original id
is then in `custom["pl_id"]`), with one `SupervisionSegment` covering the clip (text, language, no speaker).
The PL fields (confidence, lid_pred, lid_prob, teacher, num_tokens) are in the `custom` of both: on the cut for
`cuts.filter(lambda c: c.confidence >= x)`, on the supervision so they stay with the text when cuts are mixed or
cut into pieces. Recordings point at the FLAC files by absolute path (lhotse reads a relative path against the
working directory); `CutSet.with_recording_path_prefix` moves them. The FLAC bytes are those of the PL shard.

The Shar folder (`shar/`, `shar=True`) is lhotse's own `CutSet.to_shar(fields={"recording": "flac"})`: lhotse
decodes each clip and encodes it again (16-bit FLAC), so it holds the same samples but not the same bytes.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
from typing import Any

from storage.exporters import SAMPLING_RATE, flac_frames, label_fields
from storage.files import (
    AtomicWriter,
    atomic_write_bytes,
    close_quietly,
    is_local,
    join,
    list_files,
    local_path,
    remove_tree,
)

CUTS = "cuts.jsonl.gz"
SHAR = "shar"


class LhotseCutsWriter:
    """The FLAC files, written as rows come, and `cuts.jsonl.gz` streamed (visible at `commit()`)."""

    def __init__(self, out_dir: str, *, shar: bool = False, shar_shard_size: int = 1000):
        self.out_dir = out_dir
        self.shar = shar
        self.shar_shard_size = shar_shard_size
        self.audio_files = 0
        self._out = AtomicWriter(join(out_dir, CUTS))
        # The lines lhotse's SequentialJsonlWriter writes, through a temp name so a failed export leaves none.
        self._gz = gzip.GzipFile(fileobj=self._out.file, mode="wb", mtime=0)

    def write(self, row: dict[str, Any], flac: bytes) -> None:
        """Write the row's FLAC under `audio/<lang>/` and append its cut."""
        from lhotse import MonoCut, Recording, SupervisionSegment
        from lhotse.audio import AudioSource

        key, language = row["key"], row["language"]
        url = join(self.out_dir, "audio", language, f"{key}.flac")
        atomic_write_bytes(url, flac)
        self.audio_files += 1
        frames = flac_frames(flac)
        duration = frames / SAMPLING_RATE
        source = (AudioSource(type="file", channels=[0], source=os.path.abspath(local_path(url))) if is_local(url)
                  else AudioSource(type="url", channels=[0], source=url))
        cut_id = key  # the PL id itself when it is safe in a file name (storage.pl.sample_key)
        custom = label_fields(row) | ({} if cut_id == row["id"] else {"pl_id": row["id"]})
        recording = Recording(id=cut_id, sources=[source], sampling_rate=SAMPLING_RATE, num_samples=frames,
                              duration=duration)
        supervision = SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=duration, channel=0,
                                         text=row["text"], language=language, speaker=None, custom=dict(custom))
        cut = MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, recording=recording,
                      supervisions=[supervision], custom=custom)
        self._gz.write((json.dumps(cut.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))

    def commit(self) -> dict[str, Any]:
        """Make `cuts.jsonl.gz` visible, then write the Shar folder from it when asked."""
        self._gz.close()  # writes the gzip trailer; the file object stays open
        self._out.commit()
        files = [CUTS]
        if self.shar:
            files += self._write_shar()
        return {"files": files, "audio_files": self.audio_files}

    def _write_shar(self) -> list[str]:
        from lhotse import CutSet

        def lhotse_path(url: str) -> str:  # lhotse opens local paths itself and URLs through smart_open
            return os.path.abspath(local_path(url)) if is_local(url) else url

        shar_dir = join(self.out_dir, SHAR)
        remove_tree(shar_dir)  # lhotse reads every shard in the folder: an earlier export's would come along
        cuts = CutSet.from_jsonl_lazy(lhotse_path(join(self.out_dir, CUTS)))  # lazy: one cut at a time
        if is_local(shar_dir):
            os.makedirs(lhotse_path(shar_dir), exist_ok=True)  # to_shar does not make it
        cuts.to_shar(lhotse_path(shar_dir), fields={"recording": "flac"}, shard_size=self.shar_shard_size)
        return [posixpath.join(SHAR, posixpath.basename(u)) for u in list_files(shar_dir)]

    def abort(self) -> None:
        """Drop the unfinished `cuts.jsonl.gz` (FLAC files already written stay: each is whole)."""
        close_quietly(self._gz)
        self._out.abort()
