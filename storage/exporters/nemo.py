"""PL rows as a NeMo tarred audio dataset: `audio_<N>.tar` + `tarred_audio_manifest.json`.

NeMo's `TarredAudioToCharDataset`/`TarredAudioToBPEDataset` read `audio__OP_0..<N-1>_CL_.tar` with the manifest;
each manifest line's `audio_filepath` is the member name in its tar and `shard_id` the tar's number. NeMo ignores
keys it does not know, so the PL fields travel along. The FLAC bytes are those of the PL shard, unchanged.
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from typing import Any

from storage.exporters import SAMPLING_RATE, flac_frames, label_fields
from storage.files import AtomicWriter, close_quietly, join, list_files, remove
from storage.manifest import ManifestWriter

MANIFEST = "tarred_audio_manifest.json"
_TAR = re.compile(r"^audio_(\d+)\.tar$")


def tar_name(shard_id: int) -> str:
    """The tar of a NeMo shard."""
    return f"audio_{shard_id}.tar"


class NemoTarredWriter:
    """One NeMo tar per PL shard (rows must come shard by shard) and the manifest, visible at `commit()`."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.shards = 0
        self._manifest = ManifestWriter(join(out_dir, MANIFEST))
        self._pending: list[AtomicWriter] = []  # closed tars, renamed at commit so a failed export leaves none
        self._out: AtomicWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._source: str | None = None

    def write(self, row: dict[str, Any], flac: bytes) -> None:
        """Add `<key>.flac` to the tar of the row's PL shard and its manifest line."""
        if self._tar is None or row["shard"] != self._source:
            self._close_tar()
            self._out = AtomicWriter(join(self.out_dir, tar_name(self.shards)))
            self._tar = tarfile.open(fileobj=self._out.file, mode="w|")  # a stream: no seeks on object stores
            self._source = row["shard"]
            self.shards += 1
        member = f"{row['key']}.flac"
        info = tarfile.TarInfo(member)
        info.size = len(flac)
        info.mode = 0o644
        created = row.get("created_at")
        info.mtime = int(created.timestamp()) if hasattr(created, "timestamp") else 0  # same input, same tar
        self._tar.addfile(info, io.BytesIO(flac))
        self._manifest.write({
            "audio_filepath": member,
            "duration": flac_frames(flac) / SAMPLING_RATE,  # the clip in the tar, as NeMo's length filters see it
            "text": row["text"],
            "lang": row["language"],
            "shard_id": self.shards - 1,
            "id": row["id"],
            **label_fields(row),
        })

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()  # writes the end-of-archive blocks; the file object stays open
            self._out.file.close()
            self._pending.append(self._out)
            self._tar = self._out = None

    def commit(self) -> dict[str, Any]:
        """Rename the tars and the manifest into place and drop tars of an earlier, longer export."""
        self._close_tar()
        for out in self._pending:
            out.commit()
        self._manifest.commit()
        for url in list_files(self.out_dir, "audio_*.tar"):
            match = _TAR.match(posixpath.basename(url))
            if match and int(match.group(1)) >= self.shards:
                remove(url)  # NeMo globs audio__OP_0..N_CL_: a stale tar would be read with the new ones
        return {"files": [tar_name(i) for i in range(self.shards)] + [MANIFEST], "tars": self.shards}

    def abort(self) -> None:
        """Drop the tars and the manifest written so far."""
        if self._tar is not None:
            close_quietly(self._tar)
            self._pending.append(self._out)
        for out in self._pending:
            out.abort()
        self._manifest.abort()
