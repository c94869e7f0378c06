"""`akm scheduler` and `akm healthcheck` without Docker: the real command as a
subprocess, with the real supercronic (where installed) or a fake one."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import AKM, write_task
from worker import scheduler

HAVE_SUPERCRONIC = shutil.which("supercronic") is not None
needs_supercronic = pytest.mark.skipif(not HAVE_SUPERCRONIC, reason="supercronic not installed")


class Running:
    """`akm scheduler` as a child, output collected to a file."""

    def __init__(self, stash: Path, tmp: Path, env: dict | None = None):
        self.run_dir = tmp / "run"
        self.out_path = tmp / "scheduler.out"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
        self.env.update(AKM_STASH=str(stash), AKM_RUN_DIR=str(self.run_dir),
                        AKM_POLL_SECONDS="0.5", AKM_STOP_TIMEOUT="10")
        self.env.update(env or {})
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([AKM, "scheduler"], env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 15) -> str:
        end = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > end or self.proc.poll() is not None:
                raise AssertionError(f"no {needle!r} in scheduler output:\n{self.text()}")
            time.sleep(0.1)
        return self.text()

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


@pytest.fixture
def running(stash, tmp_path):
    started = []

    def start(env=None):
        r = Running(stash, tmp_path, env)
        started.append(r)
        return r
    yield start
    for r in started:
        r.close()


def _runs(stash, task_id):
    import sqlite3
    db = stash / "state.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT * FROM runs WHERE task_id = ? ORDER BY id", (task_id,))]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _wait(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# -- pure parts -----------------------------------------------------------------

def test_fingerprint_sees_add_change_remove(tmp_path):
    tasks = tmp_path / "tasks"
    assert scheduler.tasks_fingerprint(tasks) == ("missing",)
    tasks.mkdir()
    empty = scheduler.tasks_fingerprint(tasks)
    (tasks / "a.yml").write_text("x")
    added = scheduler.tasks_fingerprint(tasks)
    assert added != empty
    os.utime(tasks / "a.yml", ns=(1, 1))
    touched = scheduler.tasks_fingerprint(tasks)
    assert touched != added
    (tasks / "a.yml").unlink()
    assert scheduler.tasks_fingerprint(tasks) == empty


def test_health_problem(tmp_path):
    status = tmp_path / "scheduler.json"
    assert "no scheduler status" in scheduler.health_problem(status)
    crontab = tmp_path / "crontab"
    crontab.write_text("")
    # our own pid is alive but is not supercronic
    data = {"state": "running", "supercronic_pid": os.getpid(), "crontab": str(crontab),
            "loaded_at": 1.0, "heartbeat": time.time()}
    status.write_text(json.dumps(data))
    assert scheduler.health_problem(status) == "supercronic is not running"
    data["state"] = "stopping"
    status.write_text(json.dumps(data))
    assert scheduler.health_problem(status) == "scheduler is stopping"


def test_retention_days(monkeypatch):
    monkeypatch.delenv("AKM_RETENTION_DAYS", raising=False)
    assert scheduler.retention_days() is None
    monkeypatch.setenv("AKM_RETENTION_DAYS", "30")
    assert scheduler.retention_days() == 30
    monkeypatch.setenv("AKM_RETENTION_DAYS", "30d")
    with pytest.raises(scheduler.UsageError, match="whole number of days"):
        scheduler.retention_days()


def test_bad_stop_timeout_is_one_clean_line(stash, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
    env.update(AKM_STASH=str(stash), AKM_RUN_DIR=str(tmp_path), AKM_STOP_TIMEOUT="soon")
    done = subprocess.run([AKM, "scheduler"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 64
    assert done.stderr == "akm: AKM_STOP_TIMEOUT='soon' is not a number of seconds\n"


# -- the real supervisor ------------------------------------------------------------

@needs_supercronic
def test_schedules_reloads_and_stops(stash, tmp_path, running):
    write_task(stash, "tick", """
        schedule: "* * * * * * *"
        command: echo tick
        """)
    write_task(stash, "bad", """
        schedule: "61 * * * *"
        command: echo never
        """)
    r = running()
    out = r.wait_for("supercronic started")
    assert "invalid: " in out and "bad.yml" in out
    crontab = r.run_dir / "crontab"
    assert "akm tasks run tick --trigger schedule --detach" in crontab.read_text()
    assert "bad" not in crontab.read_text().split("tick")[-1]
    _wait(lambda: _runs(stash, "tick"), 10, "a scheduled run of tick")
    r.wait_for("[tick] tick")   # the detached runner writes to our stdout

    # healthcheck: reads the status file the scheduler keeps
    env = dict(r.env)
    done = subprocess.run([AKM, "healthcheck"], env=env, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stdout

    write_task(stash, "tock", """
        schedule: "* * * * * * *"
        command: echo tock
        """)
    r.wait_for("tasks changed", 10)
    assert "akm tasks run tock" in crontab.read_text()
    _wait(lambda: _runs(stash, "tock"), 10, "the added task to run")

    (stash / "tasks" / "tock.yml").unlink()
    _wait(lambda: "tock" not in crontab.read_text(), 10, "the removed task to leave the crontab")

    assert r.stop() == 0
    out = r.text()
    assert out.rstrip().endswith("akm scheduler: stopped")
    status = json.loads((r.run_dir / "scheduler.json").read_text())
    assert status["state"] == "stopped"
    done = subprocess.run([AKM, "healthcheck"], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "scheduler is stopped" in done.stdout


@needs_supercronic
def test_sigterm_interrupts_a_detached_run(stash, running):
    # fires at once, then every second: later firings are `skipped` (its lock)
    write_task(stash, "long", """
        schedule: "* * * * * * *"
        command: sleep 300
        """)
    r = running()
    _wait(lambda: [x for x in _runs(stash, "long") if x["status"] == "running"], 10,
          "the long task to start")
    t0 = time.monotonic()
    assert r.stop() == 0
    assert time.monotonic() - t0 < 8
    statuses = [x["status"] for x in _runs(stash, "long")]
    assert "running" not in statuses
    assert "interrupted" in statuses
    # nothing of ours is left: the detached runner and its sleep are gone
    left = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True).stdout
    for pid in left.split():
        env = Path(f"/proc/{pid}/environ")
        try:
            assert str(stash).encode() not in env.read_bytes()
        except OSError:
            pass


@needs_supercronic
def test_missing_tasks_dir_keeps_running(stash, running):
    shutil.rmtree(stash / "tasks")
    r = running()
    out = r.wait_for("supercronic started")
    assert "no tasks directory" in out
    time.sleep(1)
    assert r.proc.poll() is None
    (stash / "tasks").mkdir()
    r.wait_for("no valid, enabled task files", 10)   # an empty tasks/ is said too
    write_task(stash, "late", """
        schedule: "* * * * * * *"
        command: echo late
        """)
    r.wait_for("[late] late", 10)
    assert r.stop() == 0


def test_supercronic_dying_stops_the_scheduler(stash, tmp_path, running):
    fake = tmp_path / "fake-supercronic"
    fake.write_text("#!/bin/sh\nsleep 1\nexit 3\n")
    fake.chmod(0o755)
    r = running({"AKM_SUPERCRONIC": str(fake)})
    assert r.proc.wait(20) == 1
    assert "supercronic exited unexpectedly (exit 3)" in r.text()


def test_second_sigterm_kills_at_once(stash, tmp_path, running):
    # a "supercronic" that ignores SIGTERM: the first signal waits, the second forces
    fake = tmp_path / "stubborn"
    fake.write_text("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n")
    fake.chmod(0o755)
    r = running({"AKM_SUPERCRONIC": str(fake), "AKM_STOP_TIMEOUT": "60"})
    r.wait_for("supercronic started")
    t0 = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert r.proc.poll() is None
    assert r.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - t0 < 5
    assert "killing them" in r.text()


def test_prune_runs_as_a_reaped_child(stash, tmp_path, capsys):
    from worker.stash import Stash
    sched = scheduler.Scheduler(Stash(stash), tmp_path / "crontab", tmp_path / "status.json",
                                retention=30)
    sched.start_prune()
    assert sched.prune_pid
    _wait(lambda: sched.reap() is None and sched.prune_pid is None, 20, "prune to finish")
    assert "prune exited" not in capsys.readouterr().out   # it exited 0


def test_a_report_failing_for_hours_is_said_on_the_worker_log(tmp_path, capsys):
    import time as _time

    from worker import clock, state
    from worker.scheduler import Scheduler
    from worker.stash import Stash
    root = tmp_path / "stash"
    (root / "tasks").mkdir(parents=True)
    s = Stash(root)
    sched = Scheduler(s, tmp_path / "crontab", tmp_path / "status.json")
    sched.check_reports()                      # no state.db yet: nothing to say
    assert "health report" not in capsys.readouterr().out
    conn = state.connect(s)
    with conn:
        for hours_ago in (4, 3, 2, 1):
            conn.execute("INSERT INTO reports (attempted_at, outcome, http_status, detail) "
                         "VALUES (?, 'gone', 404, 'webhook deleted (HTTP 404)')",
                         (clock.iso(_time.time() - hours_ago * 3600),))
    sched.check_reports()
    out = capsys.readouterr().out
    assert "akm scheduler: health report: Discord reports failing for" in out
    assert "docker compose logs report" in out
    with conn:
        conn.execute("INSERT INTO reports (attempted_at, outcome, http_status, detail) "
                     "VALUES (?, 'ok', 204, 'posted')", (clock.iso(),))
    sched.check_reports()
    assert "health report" not in capsys.readouterr().out
