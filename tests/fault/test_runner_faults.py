"""The runner under host faults: SIGKILL mid-run, daemons, closed stdout,
binary and huge lines. Each case is a few seconds at most."""

import json
import os
import signal
import subprocess
import time

import pytest

from .conftest import (SECRET, assert_sound, env, kill_group, rows, run_akm, spawn_akm,
                       wait_for, write_task)

pytestmark = pytest.mark.fault


def _other_task_still_runs(stash):
    write_task(stash, "other", 'schedule: "@hourly"\ncommand: "echo other ok"\n')
    r = run_akm(stash, "tasks", "run", "other", env=env())
    assert r.returncode == 0 and "other ok" in r.stdout, r.stderr
    return r


def _command_pgid(stash, row) -> int:
    """The command's pid (= its process group) from the log's start record,
    which the runner writes right after spawning it."""
    path = stash / row["log_path"]
    wait_for(lambda: path.exists() and path.read_text().strip(), what="the start record")
    return json.loads(path.read_text().splitlines()[0])["pid"]


def test_runner_killed_with_sigkill_mid_run(stash):
    write_task(stash, "victim", """
        schedule: "@hourly"
        env:
          TOKEN: "${FAULT_SECRET}"
        command: echo "started $TOKEN"; sleep 30
    """)
    p = spawn_akm(stash, "tasks", "run", "victim")
    try:
        wait_for(lambda: rows(stash) if (stash / "state.db").exists() else None,
                 what="the run's row")
        [row] = rows(stash)
        assert row["status"] == "running"
        # The command runs in its own process group, named after its pid.
        pgid = _command_pgid(stash, row)
        wait_for(lambda: b"started" in (stash / row["log_path"]).read_bytes(), what="output")
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=10)
    finally:
        p.kill()
    kill_group(pgid)          # the orphaned command: what the scheduler's stop would do
    [row] = rows(stash)
    assert row["status"] == "running"   # nobody has looked yet
    other = _other_task_still_runs(stash)
    assert_sound(stash, out.decode(errors="replace"), err.decode(errors="replace"),
                 other.stdout, other.stderr)
    statuses = {r["task_id"]: r["status"] for r in rows(stash)}
    assert statuses == {"victim": "abandoned", "other": "success"}


def test_lock_of_a_killed_runner_is_not_stuck(stash):
    write_task(stash, "victim", 'schedule: "@hourly"\ncommand: "echo go; sleep 30"\n')
    p = spawn_akm(stash, "tasks", "run", "victim")
    wait_for(lambda: (stash / "state.db").exists() and rows(stash), what="the row")
    pgid = _command_pgid(stash, rows(stash)[0])
    p.kill()
    p.communicate(timeout=10)
    kill_group(pgid)
    write_task(stash, "victim", 'schedule: "@hourly"\ncommand: "echo second"\n')
    r = run_akm(stash, "tasks", "run", "victim", env=env())
    assert r.returncode == 0, r.stderr
    assert [x["status"] for x in rows(stash)] == ["abandoned", "success"]
    assert_sound(stash, r.stdout, r.stderr)


def test_task_that_forks_a_daemon_and_exits(stash):
    # One child stays in the group holding the pipes (the runner stops it after
    # a short drain), one detaches with setsid and closes them (out of reach,
    # and out of the way).
    write_task(stash, "daemon", """
        schedule: "@hourly"
        command: |
          sleep 300 &
          setsid sh -c 'echo $$ > detached.pid; exec sleep 300' </dev/null >/dev/null 2>&1 &
          echo forked
    """)
    t0 = time.monotonic()
    r = run_akm(stash, "tasks", "run", "daemon", env=env(), timeout=60)
    took = time.monotonic() - t0
    try:
        assert r.returncode == 0, r.stderr
        assert took < 8, f"the runner waited {took:.1f} s for a daemon"
        [row] = rows(stash)
        assert row["status"] == "success" and row["stdout"] == "forked\n"
        log = (stash / row["log_path"]).read_text()
        assert "left behind were stopped" in log
        # The in-group child is gone; only the setsid one (its own choice) lives.
        assert not _group_alive(json.loads(log.splitlines()[0])["pid"])
    finally:
        pidfile = stash / "detached.pid"
        if wait_for(pidfile.exists, timeout=5, what="detached pid") and pidfile.read_text().strip():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert_sound(stash, r.stdout, r.stderr)


def _group_alive(pgid) -> bool:
    """Whether any process of group PGID still runs (zombies waiting for
    their reaper, which may be slow outside the image, do not count)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def test_task_that_closes_stdout_and_keeps_running(stash):
    write_task(stash, "closer", """
        schedule: "@hourly"
        env:
          TOKEN: "${FAULT_SECRET}"
        command: echo before; exec >&-; sleep 2; echo "after on stderr $TOKEN" >&2
    """)
    t0 = time.monotonic()
    r = run_akm(stash, "tasks", "run", "closer", env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 >= 2        # it waited for the command, not the pipe
    [row] = rows(stash)
    assert row["status"] == "success"
    assert row["stdout"] == "before\n" and row["stderr"] == "after on stderr ***\n"
    assert_sound(stash, r.stdout, r.stderr)


def test_binary_invalid_utf8_and_one_megabyte_lines(stash):
    write_task(stash, "noisy", """
        schedule: "@hourly"
        env:
          TOKEN: "${FAULT_SECRET}"
        command: |
          head -c 300000 /dev/urandom
          printf '\\n\\377\\376 not utf-8 \\303\\050 end\\n'
          head -c 1048576 /dev/zero | tr '\\0' 'x'; echo "$TOKEN"
          head -c 1048576 /dev/zero | tr '\\0' 'y'; printf "$TOKEN" >&2
          printf 'no newline at the end %s' "$TOKEN"
    """)
    r = subprocess.run(_akm_argv("tasks", "run", "noisy"), env=_full_env(stash),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert SECRET.encode() not in r.stdout + r.stderr
    [row] = rows(stash)
    assert row["status"] == "success"
    assert row["stdout"].startswith("[... ") and row["stdout"].rstrip("\n").endswith("no newline at the end ***")
    records = [json.loads(line) for line in (stash / row["log_path"]).read_text().split("\n") if line]
    assert records[-1]["type"] == "end"
    lines = [x for x in records if x["type"] == "output"]
    text = "".join(x["line"] for x in lines)
    assert " not utf-8 " in text and "\ufffd" in text
    assert text.count("***") >= 3
    # 1 MB lines arrive as pieces: at most the 64 KiB line limit plus one read.
    assert any(x.get("partial") for x in lines)
    assert max(len(x["line"]) for x in lines) <= 2 * 64 * 1024
    assert_sound(stash, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


def _akm_argv(*args):
    from conftest import AKM
    return [AKM, *args]


def _full_env(stash):
    full = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
    full.update(AKM_STASH=str(stash), **env())
    return full
