"""state.db and the stash volume under faults: the volume full, state.db
deleted, made read-only or corrupted while the worker runs.

What must hold: a clear one-line error (exit 74, EXIT_STATE) rather than a
traceback or an "internal error"; no crash loop (each attempt fails fast and
alike, PID 1 keeps running); and a documented way back (tested here):
- corrupted: move state.db, state.db-wal and state.db-shm aside; the next
  run starts a new one (salvage old rows with `sqlite3 state.db.bad .recover`);
- read-only: make it writable again (`chattr -i`, ownership, a rw mount);
- deleted: nothing to do, the next run creates a new one; the runs it held
  are gone but their log files in logs/ stay;
- volume full: free space; the run that could not record its end shows as
  `abandoned` at the next look.

Read-only here means `chattr +i` (immutable): root, which these tests run
as, ignores file modes, so chmod 444 would prove nothing.
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from .conftest import (assert_sound, env, integrity, rows, run_akm, spawn_akm, wait_for,
                       write_task)

pytestmark = pytest.mark.fault


def _clean_line(text):
    """Every line akm printed is one of its own, with no traceback."""
    assert "Traceback" not in text
    for line in text.splitlines():
        assert line.startswith("akm"), line


@pytest.fixture
def tmpfs(tmp_path):
    root = tmp_path / "small-volume"
    root.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
    (root / "tasks").mkdir()
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


@pytest.fixture
def immutable():
    """chattr +i PATH, undone at the end whatever happens."""
    done = []

    def set_(path):
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"chattr +i does not work here: {r.stderr.strip()}")
        done.append(path)
    yield set_
    for path in done:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def _fill_task(stash):
    write_task(stash, "printer", """
        schedule: "@hourly"
        env:
          TOKEN: "${FAULT_SECRET}"
        command: yes "a line of output $TOKEN" | head -c 5000000; echo done
    """)
    write_task(stash, "other", 'schedule: "@hourly"\ncommand: "echo other ok"\n')


def test_volume_full_while_a_task_prints_recovers(tmpfs):
    stash = tmpfs
    _fill_task(stash)
    assert run_akm(stash, "tasks", "run", "other", env=env()).returncode == 0  # state.db exists
    r = run_akm(stash, "tasks", "run", "printer", env=env(), timeout=120)
    assert r.returncode in (0, 74, 70), r.stderr
    assert "Traceback" not in r.stderr
    # Free the space (the big log), as a person would, and look again.
    for log in (stash / "logs" / "tasks" / "printer").glob("*.log"):
        log.unlink()
    other = run_akm(stash, "tasks", "run", "other", env=env())
    assert other.returncode == 0 and "other ok" in other.stdout, other.stderr
    statuses = [x["status"] for x in rows(stash) if x["task_id"] == "printer"]
    assert statuses and statuses[0] in ("success", "abandoned"), statuses
    assert_sound(stash, r.stdout, r.stderr, other.stdout, other.stderr)


def test_volume_full_gives_a_clear_error(tmpfs):
    stash = tmpfs
    _fill_task(stash)
    assert run_akm(stash, "tasks", "run", "other", env=env()).returncode == 0
    r = run_akm(stash, "tasks", "run", "printer", env=env(), timeout=120)
    _clean_line(r.stderr)
    assert "internal error" not in r.stderr
    assert r.returncode in (0, 74)
    # The volume is still full: the next run must say so in one line, exit 74.
    again = run_akm(stash, "tasks", "run", "other", env=env())
    assert again.returncode == 74 and "full" in again.stderr, again.stderr


def test_state_db_read_only_never_starts_the_command(stash, immutable):
    write_task(stash, "t", 'schedule: "@hourly"\ncommand: "echo ran > ran.txt"\n')
    assert run_akm(stash, "tasks", "run", "t", env=env()).returncode == 0
    (stash / "ran.txt").unlink()
    conn = sqlite3.connect(stash / "state.db")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    immutable(stash / "state.db")
    codes = []
    for _ in range(3):       # no crash loop: each attempt fails fast and alike
        t0 = time.monotonic()
        r = run_akm(stash, "tasks", "run", "t", env=env(), timeout=60)
        assert time.monotonic() - t0 < 10
        assert "Traceback" not in r.stderr
        codes.append(r.returncode)
    assert len(set(codes)) == 1 and codes[0] != 0
    assert not (stash / "ran.txt").exists(), "the command ran with no row to record it"
    assert integrity(stash) == "ok"
    assert run_akm(stash, "runs", env=env()).returncode == 0   # readers still read


def test_state_db_read_only_is_a_clear_error(stash, immutable):
    write_task(stash, "t", 'schedule: "@hourly"\ncommand: "echo ran"\n')
    assert run_akm(stash, "tasks", "run", "t", env=env()).returncode == 0
    immutable(stash / "state.db")
    r = run_akm(stash, "tasks", "run", "t", env=env())
    _clean_line(r.stderr)
    assert r.returncode == 74 and "state.db" in r.stderr and "internal" not in r.stderr


def test_scheduler_keeps_running_with_a_read_only_state_db(stash, immutable, tmp_path):
    # PID 1 must not exit (restart: unless-stopped would make that a crash
    # loop); fixed in 6a7def4 after this case found it.
    if not shutil.which("supercronic"):
        pytest.skip("supercronic is not installed")
    write_task(stash, "t", 'schedule: "@hourly"\ncommand: "true"\n')
    assert run_akm(stash, "tasks", "run", "t", env=env()).returncode == 0
    immutable(stash / "state.db")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    p = _scheduler(stash, run_dir)
    try:
        time.sleep(3)
        assert p.poll() is None, p.communicate()[1].decode(errors="replace")
    finally:
        _stop(p)


def _scheduler(stash, run_dir):
    full = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
    full.update(AKM_STASH=str(stash), AKM_RUN_DIR=str(run_dir), **env())
    from conftest import AKM
    return subprocess.Popen([AKM, "scheduler"], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def _corrupt(db, offset=0, length=512):
    with open(db, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef" * (length // 4))


def _checkpoint(stash):
    conn = sqlite3.connect(stash / "state.db", timeout=30)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_state_db_corrupted_between_runs_then_recovered(stash):
    write_task(stash, "t", 'schedule: "@hourly"\ncommand: "echo ran"\n')
    assert run_akm(stash, "tasks", "run", "t", env=env()).returncode == 0
    _checkpoint(stash)
    _corrupt(stash / "state.db")
    for args in (("tasks", "run", "t"), ("tasks", "run", "t"), ("runs",), ("health",)):
        t0 = time.monotonic()
        r = run_akm(stash, *args, env=env())
        assert time.monotonic() - t0 < 10
        assert r.returncode == 74, (args, r.returncode, r.stderr)
        _clean_line(r.stderr)
        assert "corrupted" in r.stderr and "move it aside" in r.stderr
        assert "ran" not in r.stdout
    # The documented recovery: move the three files aside.
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        if (stash / name).exists():
            (stash / name).rename(stash / f"{name}.bad")
    r = run_akm(stash, "tasks", "run", "t", env=env())
    assert r.returncode == 0, r.stderr
    assert [x["status"] for x in rows(stash)] == ["success"]
    assert_sound(stash, r.stdout, r.stderr)


def _slow(stash):
    write_task(stash, "slow", 'schedule: "@hourly"\ncommand: "echo begin; sleep 2; echo end"\n')
    write_task(stash, "t", 'schedule: "@hourly"\ncommand: "echo ran"\n')
    assert run_akm(stash, "tasks", "run", "t", env=env()).returncode == 0
    p = spawn_akm(stash, "tasks", "run", "slow")
    wait_for(lambda: any(x["task_id"] == "slow" for x in rows(stash)), what="slow's row")
    return p


def test_state_db_corrupted_mid_run_is_a_clear_error(stash):
    p = _slow(stash)
    _checkpoint(stash)
    _corrupt(stash / "state.db", offset=4096, length=3 * 4096)
    out, err = p.communicate(timeout=60)
    err = err.decode(errors="replace")
    assert "Traceback" not in err
    assert p.returncode == 74 and "internal error" not in err, err
    # The log file is not in state.db: it should still get its end record.
    [log] = (stash / "logs" / "tasks" / "slow").glob("*.log")
    assert json.loads(log.read_text().split("\n")[-2])["type"] == "end"


def test_state_db_corrupted_mid_run_does_not_hang_or_lose_the_log(stash):
    p = _slow(stash)
    _checkpoint(stash)
    _corrupt(stash / "state.db", offset=4096, length=3 * 4096)
    out, err = p.communicate(timeout=60)
    assert "Traceback" not in err.decode(errors="replace")
    assert b"end" in out            # the command ran to its end
    [log] = (stash / "logs" / "tasks" / "slow").glob("*.log")
    records = [json.loads(x) for x in log.read_text().split("\n") if x]
    assert {"stream": "stdout", "line": "end"}.items() <= records[-1].items() \
        or records[-1]["type"] == "end"


def test_state_db_deleted_mid_run(stash):
    p = _slow(stash)
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (stash / name).unlink(missing_ok=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "Traceback" not in err.decode(errors="replace")
    # The run wrote its end into the deleted file; its log file keeps the story.
    [log] = (stash / "logs" / "tasks" / "slow").glob("*.log")
    assert json.loads(log.read_text().split("\n")[-2])["status"] == "success"
    r = run_akm(stash, "tasks", "run", "t", env=env())
    assert r.returncode == 0, r.stderr
    assert [x["task_id"] for x in rows(stash)] == ["t"]     # a new state.db
    assert_sound(stash, r.stdout, r.stderr)
