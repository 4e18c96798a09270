"""`PREFECT_PORT=<port> make server` (README, operators): the Prefect UI served on that port asks its API on
the same port, not on Prefect's default 4200 (the UI reads PREFECT_UI_API_URL, which does not follow --port).

`make` runs with `-o .venv/.mlpl-installed` and this interpreter's bin folder, so it never installs anything. The
server runs in its own session and is stopped by its PID (process group) at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.helpers.servers import free_port, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]
STAMP = ".venv/.mlpl-installed"  # the Makefile's $(STAMP), relative to ROOT


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_make_server_ui_asks_its_own_port(tmp_path):
    port = free_port()
    home = tmp_path / "prefect"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_UI_API_URL", "PREFECT_API_URL")}
    env.update(
        PREFECT_PORT=str(port),
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    log = tmp_path / "server.log"
    with log.open("w") as out:
        # BIN: this interpreter's prefect, wherever its environment lives.
        proc = subprocess.Popen(["make", "-C", str(ROOT), "-o", STAMP, "server", f"BIN={Path(sys.executable).parent}"],
                                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("make server", lambda: _get_json(f"{base}/api/health") is not None, 180, proc, log)
        settings = _get_json(f"{base}/ui-settings")
        assert settings["api_url"] == f"{base}/api", (settings, log.read_text()[-3000:])
    finally:
        stop(proc)
