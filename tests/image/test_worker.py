"""The image under a real engine: one worker container shared by the cases
that can share it (they run in order; the last one stops it).

Its stash holds: `tick` (every 2 s, prints a secret), `long` (a 10-minute
task that the schedule starts once a minute), `hello` (never scheduled, run by
hand) and `bad` (invalid). Cases add, change and remove files while `long`
runs, which is the "a long task never holds up the others" case.
"""

import sqlite3
import time
from datetime import datetime

import pytest

from .conftest import (PUID, exec_akm, logs, make_stash, remove, runs, start,
                       status_json, wait_for, write)

pytestmark = pytest.mark.docker

SECRET = "sk-test-4f9a1c2e7b3d5e6f"   # the value of MY_API_KEY in the worker's env
GRACE = 60                            # the issue: changes take effect within 60 s


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def worker(docker_client, image, tmp_path_factory):
    stash = tmp_path_factory.mktemp("image") / "stash"
    # `long` fires at a second a few seconds from now, once a minute; its
    # later firings are recorded `skipped` while the first one still runs.
    second = int(time.time() + 8) % 60
    make_stash(stash, {
        "tick": """
            schedule: "*/2 * * * * * *"
            env:
              TOKEN_COPY: "${MY_API_KEY}"
            command: echo "tick key=$MY_API_KEY copy=$TOKEN_COPY"
            """,
        "long": f"""
            schedule: "{second} * * * * * *"
            timeout: 900
            command: echo long started; sleep 600
            """,
        "hello": """
            schedule: "0 0 1 1 *"
            enabled: false
            command: echo "hello from $AKM_TASK_ID"
            """,
        "bad": """
            schedule: "every minute"
            command: echo never
            """,
    })
    container = start(docker_client, image, stash, env={"MY_API_KEY": SECRET})
    container.stash = stash
    yield container
    remove(container)


def test_seconds_schedule_fires_on_time_and_is_recorded(worker):
    stash = worker.stash
    rows = wait_for(lambda: [r for r in runs(stash, "tick") if r["status"] == "success"][-3:]
                    if len([r for r in runs(stash, "tick") if r["status"] == "success"]) >= 3 else None,
                    timeout=30, what="three runs of tick\n" + logs(worker))
    for row in rows:
        started = _iso(row["started_at"])
        assert row["trigger"] == "schedule"
        assert started.second % 2 == 0 and started.microsecond < 800_000, row["started_at"]
        log = stash / row["log_path"]
        assert log.is_file(), row["log_path"]
        assert log.stat().st_uid == PUID          # the host user owns what the worker writes
        assert "tick key=***" in log.read_text()
    assert (stash / "state.db").stat().st_uid == PUID


def test_manual_run_with_docker_exec(worker):
    code, out = exec_akm(worker, "tasks", "run", "hello")
    assert code == 0, out
    assert "hello from hello" in out
    row = runs(worker.stash, "hello")[-1]
    assert (row["trigger"], row["status"], row["exit_code"]) == ("manual", "success", 0)
    # run as root by `docker exec`, it still wrote as PUID
    assert (worker.stash / row["log_path"]).stat().st_uid == PUID


def test_invalid_file_reported_and_the_others_run(worker):
    assert "invalid: /stash/tasks/bad.yml" in logs(worker)
    code, out = exec_akm(worker, "tasks", "validate")
    assert code == 1 and "bad.yml" in out, out
    assert not runs(worker.stash, "bad")
    n = len(runs(worker.stash, "tick"))
    wait_for(lambda: len(runs(worker.stash, "tick")) > n, 10, what="tick to keep running")


def test_healthcheck(worker):
    code, out = exec_akm(worker, "healthcheck")
    assert code == 0, out
    assert status_json(worker)["supercronic_pid"]


def test_changes_take_effect_while_a_long_task_runs(worker):
    stash = worker.stash
    wait_for(lambda: [r for r in runs(stash, "long") if r["status"] == "running"], 75,
             what="the long task to start\n" + logs(worker))

    # add
    t0 = time.monotonic()
    write(stash, "fresh", """
        schedule: "*/2 * * * * * *"
        command: echo fresh v1
        """)
    wait_for(lambda: runs(stash, "fresh"), GRACE, what="the added task to run")
    added = time.monotonic() - t0

    # change
    t0 = time.monotonic()
    write(stash, "fresh", """
        schedule: "*/2 * * * * * *"
        command: echo fresh v2
        """)

    def changed():
        return [r for r in runs(stash, "fresh") if "fresh v2" in (r["stdout"] or "")]
    wait_for(changed, GRACE, what="the changed task to run its new command")
    updated = time.monotonic() - t0

    # remove: after a reload no new run starts
    t0 = time.monotonic()
    (stash / "tasks" / "fresh.yml").unlink()
    wait_for(lambda: "tasks changed" in logs(worker).split("fresh v2")[-1], GRACE,
             what="the reload after the removal")
    time.sleep(3)
    count = len(runs(stash, "fresh"))
    time.sleep(5)
    assert len(runs(stash, "fresh")) == count, "a removed task still runs"
    removed = time.monotonic() - t0
    print(f"took effect: add {added:.1f} s, change {updated:.1f} s, remove {removed:.1f} s")
    assert max(added, updated) < GRACE

    # meanwhile the long task kept running, and tick kept its schedule
    assert [r for r in runs(stash, "long") if r["status"] == "running"]
    recent = [r for r in runs(stash, "tick") if r["status"] == "success"][-5:]
    gaps = [(_iso(b["started_at"]) - _iso(a["started_at"])).total_seconds()
            for a, b in zip(recent, recent[1:])]
    assert all(1.5 < g < 2.5 for g in gaps), gaps


def test_secret_appears_nowhere(worker):
    stash = worker.stash
    assert SECRET not in logs(worker)
    conn = sqlite3.connect(stash / "state.db", timeout=30)
    try:
        dump = "\n".join(conn.iterdump())
    finally:
        conn.close()
    assert "tick key=***" in dump
    assert SECRET not in dump
    for path in (stash / "logs").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_docker_stop_interrupts_running_tasks(worker):
    stash = worker.stash
    assert [r for r in runs(stash, "long") if r["status"] == "running"]
    # a root `docker exec` session the worker cannot signal must not hold up the stop
    worker.exec_run(["sleep", "300"], user="root", detach=True)
    t0 = time.monotonic()
    worker.stop(timeout=30)
    took = time.monotonic() - t0
    worker.reload()
    assert worker.attrs["State"]["ExitCode"] == 0, logs(worker)[-2000:]
    assert took < 10, f"docker stop took {took:.1f} s"
    assert not [r for r in runs(stash) if r["status"] == "running"]
    statuses = {r["status"] for r in runs(stash, "long")}
    assert "interrupted" in statuses, statuses
    assert "stopped" in logs(worker)
