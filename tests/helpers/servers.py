"""Helpers for tests that start a server in its own process (Prefect, moto): a free port, waiting until it answers,
and stopping its whole process group by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, proc: subprocess.Popen | None = None,
             log: Path | None = None, poll_s: float = 0.5) -> Any:
    """`check()`'s first truthy answer (exceptions mean: not ready yet); fails early, with the log's tail, when
    `proc` exits, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        try:
            out = check()
            if out:
                return out
        except Exception:  # not up yet
            pass
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not ready after {timeout_s:.0f} s\n{log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group a `start_new_session` process leads (the server and what it started), SIGKILL it
    when it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:  # children may outlive their leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(10)


def all_artifacts(client: Any) -> list[Any]:
    """Every artifact a Prefect server holds: the API hands out at most 200 a call, and a recipe run makes more."""
    found: list[Any] = []
    while page := client.read_artifacts(offset=len(found), limit=200):
        found += page
    return found
