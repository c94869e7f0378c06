"""Shared helpers for the fault suite (issue 5).

Every case ends by checking what must hold after the fault, with `assert_sound`:
every run recorded with a final status (after `akm runs` has applied
mark_abandoned), `PRAGMA integrity_check` ok, the secret nowhere on the
volume or in what the runner printed, no traceback.
"""

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from conftest import AKM, run_akm, write_task  # noqa: F401  (tests/conftest.py)

SECRET = "fault-secret-7c1e9b2a"     # BENCH/FAULT_SECRET in the runner's env
FINAL = {"success", "failed", "timeout", "error", "skipped", "interrupted", "abandoned"}


def env(**extra):
    return {"FAULT_SECRET": SECRET, **extra}


def rows(stash, sql="SELECT * FROM runs ORDER BY id", params=()):
    conn = sqlite3.connect(Path(stash) / "state.db", timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def integrity(stash) -> str:
    conn = sqlite3.connect(Path(stash) / "state.db", timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def no_secret_on_volume(root):
    for path in Path(root).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret found in {path}"


def assert_sound(stash, *outputs):
    """The invariants every fault case ends with."""
    looked = run_akm(stash, "runs", "--limit", "1000", env=env())   # applies mark_abandoned
    assert looked.returncode == 0, looked.stderr
    for r in rows(stash):
        assert r["status"] in FINAL, f"run {r['id']} ({r['task_id']}) left {r['status']!r}"
        assert r["ended_at"], f"run {r['id']} has no ended_at"
    assert integrity(stash) == "ok"
    no_secret_on_volume(stash)
    for text in (*outputs, looked.stdout, looked.stderr):
        assert SECRET not in text
        assert "Traceback" not in text


def wait_for(pred, timeout=15.0, interval=0.05, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def spawn_akm(stash, *args, **kw) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
    full.update(AKM_STASH=str(stash), **env())
    return subprocess.Popen([AKM, *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)
