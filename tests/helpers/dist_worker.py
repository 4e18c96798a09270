"""`mlpl` under torchrun with a trace of what each rank did, for tests/unit/test_distributed.py.

Each rank appends to `$MLPL_TRACE_DIR/rank<r>.jsonl`: the ids of every batch it trained on with a hash of its
weights after the update, and every file it wrote. With `MLPL_KILL_AT_UPDATE=n`, rank 0 SIGKILLs itself right
after update n, as a machine failure would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

from fsspec.implementations.local import LocalFileSystem

from flows.cli import main
from pipeline.engine.trainer import Trainer

RANK = int(os.environ.get("RANK", "0"))
TRACE = open(os.path.join(os.environ["MLPL_TRACE_DIR"], f"rank{RANK}.jsonl"), "a")  # noqa: SIM115
KILL_AT = int(os.environ.get("MLPL_KILL_AT_UPDATE", "0"))


def emit(**row) -> None:
    """One trace line, flushed (a killed rank keeps what it traced)."""
    TRACE.write(json.dumps(row) + "\n")
    TRACE.flush()


def weights_sha(model) -> str:
    """sha256 over every parameter's bytes."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_update = Trainer.update


def update(self, batch, **kwargs):
    info = _update(self, batch, **kwargs)
    emit(kind="update", step=self.step, ids=sorted(batch.ids), weights=weights_sha(self.model), loss=info["loss"])
    if KILL_AT and RANK == 0 and self.step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return info


def traced(name):
    original = getattr(LocalFileSystem, name)

    def write(self, path, *args, **kwargs):
        emit(kind="write", op=name, path=str(path))
        return original(self, path, *args, **kwargs)

    return write


Trainer.update = update
for _name in ("pipe_file", "mv", "cp_file", "rm_file", "rm"):
    setattr(LocalFileSystem, _name, traced(_name))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
