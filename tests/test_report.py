"""The sidecar: schedule, settings, recording, and what it does for each answer."""

import io
import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import AKM, write_task
from fake_discord import FakeDiscord
from worker import clock, discord, state
from worker.health import Kind, check
from worker.report import REPEAT_EVERY, Settings, Sidecar
from worker.stash import Stash

START = datetime(2026, 11, 25, 6, 58, 30, tzinfo=timezone.utc)


class FakeClock:
    """Wall and monotonic time that move only when the sidecar sleeps."""

    def __init__(self, start=START):
        self.wall, self.mono, self.slept = start, 1000.0, 0.0

    def now(self):
        return self.wall

    def monotonic(self):
        return self.mono

    def sleep(self, seconds):
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds
        self.slept += seconds


def settings(url, **env):
    return Settings.from_env({"DISCORD_WEBHOOK_URL": url, **env})


def sidecar(stash, s, clk=None, stop_after=None, **kw):
    clk = clk or FakeClock()
    out = io.StringIO()
    car = Sidecar(Stash(stash), s, now=clk.now, sleep=clk.sleep, monotonic=clk.monotonic,
                  out=out, **kw)
    car.posted_at = []
    real_post = kw.get("post", discord.post)

    def counting_post(url, body, sleep):
        car.posted_at.append(clk.now())
        result = real_post(url, body, sleep=sleep)
        if stop_after and len(car.posted_at) >= stop_after:
            car.stop = True
        return result
    car._post = counting_post
    return car, clk, out


def reports(stash):
    conn = state.connect(Stash(stash))
    rows = [dict(r) for r in conn.execute("SELECT * FROM reports ORDER BY id")]
    conn.close()
    return rows


@pytest.fixture
def fake():
    with FakeDiscord() as d:
        yield d


def failing_task(stash):
    write_task(stash, "job", "schedule: '0 * * * *'\ncommand: 'false'\n")
    conn = state.connect(Stash(stash))
    with conn:
        conn.execute("INSERT INTO runs (task_id, trigger, status, started_at, exit_code) "
                     "VALUES ('job', 'schedule', 'failed', ?, 1)",
                     (clock.iso_dt(START - timedelta(minutes=58)),))
    conn.close()


# -- settings ------------------------------------------------------------------------

def test_settings_defaults_and_problems():
    s = Settings.from_env({"DISCORD_WEBHOOK_URL": "https://discord.com/api/webhooks/1/t"})
    assert (s.schedule, s.on_start, s.only_problems, s.username, s.problem) == \
        ("0 * * * *", False, False, None, None)
    assert Settings.from_env({}).problem == "DISCORD_WEBHOOK_URL is not set"
    bad = Settings.from_env({"DISCORD_WEBHOOK_URL": "https://discord.com/api/webhooks/1/t",
                             "REPORT_SCHEDULE": "61 * * * *"})
    assert bad.problem.startswith("REPORT_SCHEDULE '61 * * * *'")
    s = Settings.from_env({"REPORT_ON_START": "1", "REPORT_ONLY_PROBLEMS": "true",
                           "REPORT_USERNAME": "ops"})
    assert s.on_start and s.only_problems and s.username == "ops"


# -- one tick -------------------------------------------------------------------------

def test_a_post_is_recorded(stash, fake):
    failing_task(stash)
    car, clk, out = sidecar(stash, settings(fake.url, REPORT_USERNAME="ops"))
    result = car.tick()
    assert result.ok
    body = fake.requests[0]["body"]
    assert body["username"] == "ops" and fake.requests[0]["errors"] == []
    assert "failed · job" in body["embeds"][0]["fields"][0]["name"]
    [row] = reports(stash)
    assert (row["outcome"], row["http_status"]) == ("ok", 204)
    assert row["attempted_at"] == clock.iso_dt(START)
    assert "posted the report (1 problem)" in out.getvalue()
    assert fake.token not in out.getvalue()


def test_window_defaults_to_the_schedule_interval(stash, fake):
    car, _, _ = sidecar(stash, settings(fake.url, REPORT_SCHEDULE="*/15 * * * *"))
    assert car.window(START) == timedelta(minutes=15)
    car, _, _ = sidecar(stash, settings(fake.url, REPORT_WINDOW="6h"))
    assert car.window(START) == timedelta(hours=6)


def test_only_problems_skips_a_healthy_report(stash, fake):
    car, _, out = sidecar(stash, settings(fake.url, REPORT_ONLY_PROBLEMS="1"))
    assert car.tick() is None
    assert fake.requests == [] and "not posting" in out.getvalue()
    failing_task(stash)
    assert car.tick().ok and len(fake.requests) == 1


def test_rate_limited_then_posted(stash, fake):
    fake.script("rate_limit", "ok")
    car, clk, _ = sidecar(stash, settings(fake.url))
    assert car.tick().ok
    assert clk.slept == pytest.approx(0.5) and len(fake.requests) == 2
    assert [r["outcome"] for r in reports(stash)] == ["ok"]


def test_server_errors_are_recorded_after_bounded_retries(stash, fake):
    fake.script(*["server_error"] * 10)
    car, _, out = sidecar(stash, settings(fake.url))
    result = car.tick()
    assert result.outcome is discord.Outcome.SERVER_ERROR and len(fake.requests) == 4
    assert reports(stash)[0]["http_status"] == 500
    assert "report not posted (server_error, 4 attempts)" in out.getvalue()


def test_bad_request_is_recorded_with_discords_reason(stash, fake):
    fake.script("bad_request")
    car, _, _ = sidecar(stash, settings(fake.url))
    assert car.tick().outcome is discord.Outcome.REJECTED
    assert "Invalid Form Body" in reports(stash)[0]["detail"]


def test_dead_webhook_is_said_hourly_and_becomes_a_health_problem(stash, fake):
    fake.script(*["not_found"] * 10)
    car, clk, out = sidecar(stash, settings(fake.url, REPORT_SCHEDULE="*/20 * * * *"),
                            stop_after=4)
    assert car.run() == 0
    # Every 20 minutes a tick, but a 404 is tried again only once an hour.
    assert len(fake.requests) == 4
    gaps = [(b - a).total_seconds() for a, b in zip(car.posted_at, car.posted_at[1:])]
    assert all(g >= REPEAT_EVERY for g in gaps)
    log = out.getvalue()
    assert log.count("WEBHOOK NOT USABLE") == 4 and "HTTP 404 Unknown Webhook" in log
    assert fake.token not in log
    assert all(r["outcome"] == "gone" for r in reports(stash))
    report = check(Stash(stash), clk.now(), timedelta(hours=1))
    assert [p.kind for p in report.problems] == [Kind.REPORT_FAILING]


# -- the loop ---------------------------------------------------------------------------

def test_posts_at_each_fire_time_and_once_at_start(stash, fake):
    car, clk, _ = sidecar(stash, settings(fake.url, REPORT_ON_START="1",
                                          REPORT_SCHEDULE="0 * * * *"), stop_after=3)
    assert car.run() == 0
    assert car.posted_at == [START, datetime(2026, 11, 25, 7, tzinfo=timezone.utc),
                             datetime(2026, 11, 25, 8, tzinfo=timezone.utc)]


def test_a_suspend_posts_once_not_for_every_missed_tick(stash, fake):
    car, clk, _ = sidecar(stash, settings(fake.url, REPORT_SCHEDULE="*/5 * * * *"),
                          stop_after=2)
    real_sleep = clk.sleep
    jumped = []

    def sleep(seconds):
        if not jumped:      # the laptop sleeps for 3 hours; monotonic stands still
            clk.wall += timedelta(hours=3)
            jumped.append(1)
        real_sleep(seconds)
    car._sleep = sleep
    car.run()
    first, second = car.posted_at
    assert first - START >= timedelta(hours=3)
    assert second - first <= timedelta(minutes=5)


def test_missing_url_idles_with_one_line_an_hour(stash):
    clk = FakeClock()
    out = io.StringIO()
    car = Sidecar(Stash(stash), Settings.from_env({}), now=clk.now, sleep=clk.sleep,
                  monotonic=clk.monotonic, out=out)
    real_sleep = clk.sleep

    def sleep(seconds):
        real_sleep(seconds)
        if clk.slept >= 3 * REPEAT_EVERY:
            car.stop = True
    car._sleep = sleep
    assert car.run() == 0
    lines = out.getvalue().splitlines()
    assert "cannot post: DISCORD_WEBHOOK_URL is not set" in lines[0]
    assert sum("still cannot post" in line for line in lines) == 2
    assert {r["outcome"] for r in reports(stash)} == {"not_configured"}


# -- the real command -------------------------------------------------------------------

def _env(stash, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AKM_", "DISCORD_", "REPORT_"))}
    env.update(AKM_STASH=str(stash), PYTHONUNBUFFERED="1", **extra)
    return env


def _wait_for(predicate, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sidecar_posts_on_start_and_stops_promptly_on_sigterm(stash, fake):
    proc = subprocess.Popen([AKM, "report", "--discord"], env=_env(
        stash, DISCORD_WEBHOOK_URL=fake.url, REPORT_ON_START="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: fake.requests), "no post at start"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert time.monotonic() - started < 2
    assert proc.returncode == 0, err
    assert "posted the report" in out and "stopping" in out
    assert fake.token not in out + err


def test_sidecar_without_url_waits_instead_of_exiting(stash):
    proc = subprocess.Popen([AKM, "report", "--discord"], env=_env(stash),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out.count("DISCORD_WEBHOOK_URL is not set") == 1 and "Traceback" not in err


def test_once_exit_codes(stash, fake):
    def once(**extra):
        return subprocess.run([AKM, "report", "--discord", "--once"], env=_env(stash, **extra),
                              capture_output=True, text=True, timeout=30)
    assert once(DISCORD_WEBHOOK_URL=fake.url).returncode == 0
    fake.script("not_found")
    r = once(DISCORD_WEBHOOK_URL=fake.url)
    assert r.returncode == 1 and "404" in r.stdout and fake.token not in r.stdout
    r = once(DISCORD_WEBHOOK_URL="https://example.com/hook")
    assert r.returncode == 64 and "does not look like a webhook URL" in r.stderr
    r = subprocess.run([AKM, "report"], env=_env(stash), capture_output=True, text=True)
    assert r.returncode == 64
    assert [row["outcome"] for row in reports(stash)] == ["ok", "gone"]
    assert json.dumps(reports(stash)).count(fake.token) == 0


def test_unreadable_state_db_is_posted_as_news(stash, fake):
    (stash / "state.db").write_bytes(b"not a database at all" * 200)
    car, _, out = sidecar(stash, settings(fake.url))
    assert car.tick().ok
    body = fake.requests[0]["body"]
    assert body["embeds"][0]["color"] == discord.RED and fake.requests[0]["errors"] == []
    assert "corrupted" in body["embeds"][0]["description"]
    assert "cannot build the report" in out.getvalue()
