"""akm health: real histories in a real state.db, time travel by passing `now`."""

import fcntl
import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from conftest import run_akm, write_task
from worker import clock, state
from worker.health import Kind, check, human, late_grace
from worker.stash import Stash

NOW = datetime(2026, 11, 25, 6, 20, tzinfo=timezone.utc)   # a Wednesday
DAY = timedelta(days=1)
LONG_AGO = NOW - timedelta(days=60)


def at(text) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def task(stash, task_id, schedule, mtime=LONG_AGO, **fields):
    lines = [f"schedule: {json.dumps(schedule)}", "command: echo hi"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in fields.items()]
    path = write_task(stash, task_id, "\n".join(lines) + "\n")
    os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return path


@pytest.fixture
def db(stash):
    conn = state.connect(Stash(stash))
    yield conn
    conn.close()


def add_run(conn, task_id, started, status="success", minutes=1, exit_code=None,
            tokens=(0, 0), cost=0.0, error=None, runner=None):
    ended = None if status == "running" else clock.iso_dt(started + timedelta(minutes=minutes))
    if exit_code is None:
        exit_code = {"success": 0, "failed": 1}.get(status)
    with conn:
        cur = conn.execute(
            "INSERT INTO runs (task_id, trigger, status, started_at, ended_at, exit_code, "
            "prompt_tokens, completion_tokens, cost_usd, error, runner) "
            "VALUES (?, 'schedule', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (task_id, status, clock.iso_dt(started), ended, exit_code, tokens[0], tokens[1],
             cost, error, runner))
    return cur.lastrowid


def hourly_history(conn, task_id, last, hours=30):
    return [add_run(conn, task_id, last - timedelta(hours=h, seconds=-1)) for h in range(hours)]


def kinds(report, task_id=None):
    return sorted(str(p.kind) for p in report.problems if task_id is None or p.task == task_id)


def health(stash, now=NOW, window=DAY, tz="UTC"):
    return check(Stash(stash), now, window, tz)


# -- late ---------------------------------------------------------------------

def test_hourly_task_on_time_is_healthy(stash, db):
    task(stash, "hourly", "0 * * * *")
    hourly_history(db, "hourly", at("2026-11-25T06:00"))
    report = health(stash)
    assert report.ok, report.problems
    s = report.tasks[0]
    assert (s.runs, s.successes, s.failures, s.last_status) == (24, 24, 0, "success")
    assert s.next_run == "2026-11-25T07:00:00.000Z"


def test_hourly_task_missing_a_fire_is_late_only_after_its_grace(stash, db):
    task(stash, "hourly", "0 * * * *")
    hourly_history(db, "hourly", at("2026-11-25T05:00"))
    assert health(stash, at("2026-11-25T06:05:59")).ok          # grace: 10% of 1h = 6m
    report = health(stash, at("2026-11-25T06:07"))
    assert kinds(report) == ["late"]
    assert "expected at 2026-11-25 06:00 UTC, 7m late (grace 6m)" in report.problems[0].detail


def test_every_five_minutes_grace_is_one_minute(stash, db):
    task(stash, "often", "*/5 * * * *")
    add_run(db, "often", at("2026-11-25T06:10:00.2"))
    assert health(stash, at("2026-11-25T06:15:59")).ok
    report = health(stash, at("2026-11-25T06:20:30"))
    assert kinds(report) == ["late"]
    assert "5m 30s late (grace 1m)" in report.problems[0].detail


def test_weekly_task(stash, db):
    task(stash, "weekly", "0 3 * * 1")                          # Mondays 03:00
    add_run(db, "weekly", at("2026-11-16T03:00:01"))
    report = health(stash, window=timedelta(days=14))
    assert kinds(report) == ["late"]
    assert "expected at 2026-11-23 03:00 UTC, 2d 3h late (grace 1h)" in report.problems[0].detail
    add_run(db, "weekly", at("2026-11-23T03:00:01"))
    assert health(stash).ok


def test_task_grace_overrides_the_default(stash, db):
    task(stash, "weekly", "0 3 * * 1", grace=600)
    add_run(db, "weekly", at("2026-11-16T03:00:01"))
    assert health(stash, at("2026-11-23T03:09:59")).ok
    assert kinds(health(stash, at("2026-11-23T03:10:01"))) == ["late"]


def test_never_run_task_counts_from_its_file_or_the_worker_start(stash, db):
    task(stash, "fresh", "0 * * * *", mtime=at("2026-11-25T06:01"))
    assert health(stash).ok                                     # first fire 07:00
    task(stash, "fresh", "0 * * * *", mtime=LONG_AGO)           # old file ...
    state.set_meta(db, "scheduler_started_at", "2026-11-25T06:10:00.000Z")
    assert health(stash).ok                                     # ... worker just started
    state.set_meta(db, "scheduler_started_at", "2026-11-25T04:10:00.000Z")
    report = health(stash)
    assert kinds(report) == ["late"]
    assert "expected at 2026-11-25 05:00 UTC, 1h 20m late" in report.problems[0].detail
    assert "never run" in report.problems[0].detail


def test_disabled_task_is_never_late_and_has_no_next_run(stash, db):
    task(stash, "off", "*/5 * * * *", enabled=False)
    add_run(db, "off", NOW - timedelta(days=3))
    report = health(stash)
    assert report.ok
    assert report.tasks[0].next_run is None and report.tasks[0].enabled is False


def test_dst_autumn_transition_new_york(stash, db):
    # 09:00 New York is 13:00 UTC on 31 Oct (EDT) and 14:00 UTC on 1 Nov (EST):
    # arithmetic in UTC would call the task late at 13:30 UTC.
    task(stash, "morning", "0 9 * * *", grace=600)
    add_run(db, "morning", at("2026-10-31T13:00:01"))
    assert health(stash, at("2026-11-01T14:09"), tz="America/New_York").ok
    report = health(stash, at("2026-11-01T14:15"), tz="America/New_York")
    assert kinds(report) == ["late"]
    assert "2026-11-01 09:00 EST (14:00 UTC), 15m late" in report.problems[0].detail


def test_default_grace_rule():
    class T:
        grace = None
        schedule = "*/5 * * * *"
    due = at("2026-11-25T00:00")                                 # a fire time of each
    assert late_grace(T, due, "UTC") == 60
    T.schedule = "0 * * * *"
    assert late_grace(T, due, "UTC") == 360
    T.schedule = "0 0 * * *"
    assert late_grace(T, due, "UTC") == 3600


# -- run problems ------------------------------------------------------------------

@pytest.mark.parametrize("status", ["failed", "timeout", "error", "abandoned"])
def test_each_failure_status_is_a_problem_in_the_window_only(stash, db, status):
    task(stash, "job", "0 * * * *")
    hourly_history(db, "job", at("2026-11-25T06:00"))
    rid = add_run(db, "job", NOW - timedelta(hours=2), status, error="boom: API said no")
    report = health(stash)
    assert kinds(report) == [status]
    p = report.problems[0]
    assert p.run_id == rid and "boom: API said no" in p.detail
    assert p.logs_command == f"akm logs job --run {rid}"
    assert report.tasks[0].failures == 1
    assert health(stash, window=timedelta(hours=1)).ok


def test_repeated_failures_are_one_problem_with_a_count(stash, db):
    task(stash, "often", "*/5 * * * *")
    ids = [add_run(db, "often", NOW - timedelta(minutes=5 * i), "failed") for i in range(1, 13)]
    report = health(stash)
    assert kinds(report) == ["failed"]
    assert report.problems[0].run_id == max(ids)
    assert report.problems[0].detail.startswith("12 times in the last 24h")


def test_stale_running_row_is_marked_abandoned(stash, db):
    task(stash, "job", "0 * * * *")
    hourly_history(db, "job", at("2026-11-25T05:00"))
    rid = add_run(db, "job", at("2026-11-25T06:00:01"), "running", runner="gone-token")
    report = health(stash)
    assert kinds(report) == ["abandoned"] and report.problems[0].run_id == rid
    assert state.get_run(db, rid)["status"] == "abandoned"


@pytest.fixture
def live_runner(stash):
    """A runner that is alive: its live file exists and is locked."""
    held = []

    def hold(task_id, token):
        locks = Stash(stash).locks_dir
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{task_id}.{token}.live", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    yield hold
    for fd in held:
        os.close(fd)


def test_running_long_past_timeout_plus_grace(stash, db, live_runner):
    task(stash, "slow", "0 * * * *", timeout=60)
    hourly_history(db, "slow", at("2026-11-25T05:00"))
    live_runner("slow", "tok")
    rid = add_run(db, "slow", at("2026-11-25T06:00:01"), "running", runner="tok")
    assert health(stash, at("2026-11-25T06:01:59")).ok           # 60 s + 60 s grace
    report = health(stash, at("2026-11-25T06:02:30"))
    assert kinds(report) == ["running_long"] and report.problems[0].run_id == rid
    assert state.get_run(db, rid)["status"] == "running"


def test_over_budget(stash, db):
    task(stash, "agent", "0 * * * *", token_budget=1000)
    hourly_history(db, "agent", at("2026-11-25T05:00"))
    add_run(db, "agent", at("2026-11-25T06:00:01"), tokens=(400, 500))
    assert health(stash).ok
    rid = add_run(db, "agent", at("2026-11-25T06:10"), tokens=(600, 500))
    report = health(stash)
    assert kinds(report) == ["over_budget"] and report.problems[0].run_id == rid
    assert "budget of 1,000 tokens" in report.problems[0].detail
    assert "used 1,100" in report.problems[0].detail


def test_invalid_task_file(stash, db):
    write_task(stash, "broken", "schedule: '61 * * * *'\ncommand: echo\n")
    report = health(stash)
    assert kinds(report) == ["invalid"]
    assert report.problems[0].task == "broken" and "minute" in report.problems[0].detail


def test_report_failing_for_three_hours(stash, db):
    def attempt(when, outcome, status=None):
        with db:
            db.execute("INSERT INTO reports (attempted_at, outcome, http_status, detail) "
                       "VALUES (?, ?, ?, ?)", (clock.iso_dt(when), outcome, status,
                                               f"HTTP {status} Unknown Webhook"))
    attempt(NOW - timedelta(hours=5), "ok", 204)
    for h in (3, 2, 1):
        attempt(NOW - timedelta(hours=h, minutes=-1), "gone", 404)
    assert health(stash).ok                                      # 2h59m
    report = health(stash, NOW + timedelta(minutes=2))
    assert kinds(report) == ["report_failing"]
    assert report.problems[0].task is None and "404" in report.problems[0].detail
    attempt(NOW + timedelta(minutes=1), "ok", 204)
    assert health(stash, NOW + timedelta(minutes=2)).ok


def test_runs_of_a_deleted_task_still_count(stash, db):
    add_run(db, "gone", NOW - timedelta(hours=1), "failed")
    report = health(stash)
    assert kinds(report) == ["failed"]
    assert report.tasks[0].task == "gone" and report.tasks[0].enabled is None


def test_human():
    assert [human(s) for s in (5, 60, 330, 3600, 7500, 90000)] == \
        ["5s", "1m", "5m 30s", "1h", "2h 5m", "1d 1h"]


# -- the command ----------------------------------------------------------------

def test_fresh_stash_is_healthy_and_not_written(stash, akm):
    r = akm("health")
    assert r.returncode == 0, r.stderr
    assert "akm health: OK" in r.stdout
    assert not (stash / "state.db").exists()


def test_exit_codes(stash, akm, tmp_path):
    assert akm("health", "--window", "7x").returncode == 64
    assert "--window" in akm("health", "--window", "0h").stderr
    r = run_akm(tmp_path / "nowhere", "health")
    assert r.returncode == 66 and "does not exist" in r.stderr
    (stash / "state.db").write_bytes(b"this is not a database" * 100)
    r = akm("health")
    assert r.returncode == 74 and "Traceback" not in r.stderr, r.stderr


def _cli_history(stash):
    now = datetime.now(timezone.utc)
    task(stash, "hourly", "0 * * * *")
    task(stash, "a-task-with-a-rather-long-name", "*/5 * * * *", enabled=False)
    conn = state.connect(Stash(stash))
    last = now.replace(minute=0, second=1, microsecond=0)
    hourly_history(conn, "hourly", last, hours=5)
    rid = add_run(conn, "hourly", last - timedelta(minutes=30), "failed",
                  error="upstream said 500 " + "x" * 200)
    conn.close()
    return rid


def test_text_fits_80_columns_and_names_the_logs_command(stash, akm):
    rid = _cli_history(stash)
    r = akm("health")
    assert r.returncode == 1, r.stderr
    assert f"akm logs hourly --run {rid}" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert "TASK" in r.stdout and "disabled" in r.stdout


def test_json_shape(stash, akm):
    rid = _cli_history(stash)
    r = akm("health", "--format", "json", "--window", "6h")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert list(data) == ["ok", "generated_at", "window", "problems", "tasks"]
    assert data["ok"] is False and data["window"] == "6h"
    assert data["problems"] == [{"task": "hourly", "kind": "failed", "run_id": rid,
                                 "detail": data["problems"][0]["detail"]}]
    assert set(data["tasks"][0]) == {
        "task", "enabled", "schedule", "runs", "successes", "failures", "tokens", "cost_usd",
        "last_status", "last_run_id", "last_started_at", "next_run"}


def test_discord_format_is_a_valid_webhook_body(stash, akm):
    from fake_discord import validate
    _cli_history(stash)
    r = akm("health", "--format", "discord")
    body = json.loads(r.stdout)
    assert validate(body) == []
    assert body["allowed_mentions"] == {"parse": []}


def test_corrupt_state_db_in_the_middle_is_exit_74(stash, akm):
    _cli_history(stash)
    conn = sqlite3.connect(stash / "state.db")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray((stash / "state.db").read_bytes())
    data[4096:8192] = b"\xff" * 4096     # smash a page of the runs table
    (stash / "state.db").write_bytes(bytes(data))
    r = akm("health")
    assert r.returncode in (0, 1, 74) and "Traceback" not in r.stderr
    assert "internal error" not in r.stderr


def test_every_kind_at_once_each_exactly_once(stash, db, live_runner):
    for t in ("ok", "bad", "slow"):
        task(stash, t, "0 * * * *", timeout=60, token_budget=1000)
        hourly_history(db, t, at("2026-11-25T06:00"))
    task(stash, "missed", "0 * * * *")
    hourly_history(db, "missed", at("2026-11-25T05:00"))
    write_task(stash, "broken", "schedule: 'every hour'\ncommand: echo\n")
    for status in ("failed", "timeout", "error", "abandoned"):
        add_run(db, "bad", NOW - timedelta(minutes=30), status)
    add_run(db, "bad", NOW - timedelta(minutes=20), tokens=(900, 200))
    live_runner("slow", "tok")
    add_run(db, "slow", NOW - timedelta(minutes=10), "running", runner="tok")
    with db:
        db.execute("INSERT INTO reports (attempted_at, outcome, http_status) "
                   "VALUES (?, 'gone', 404)", (clock.iso_dt(NOW - timedelta(hours=4)),))
    report = health(stash)
    assert [str(p.kind) for p in report.problems] == [str(k) for k in Kind]
    assert not [p for p in report.problems if p.task == "ok"]
    data = report.as_json()
    assert {p["kind"] for p in data["problems"]} == {str(k) for k in Kind}
    json.dumps(data)
