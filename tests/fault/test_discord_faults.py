"""The Discord endpoint misbehaving: hanging, answering slowly, answering 429
forever. The sidecar's post is bounded in time whatever the server does,
each attempt is recorded where `akm health` sees it, the webhook token is
never printed, and the loop carries on (other posts unaffected)."""

import io
import os
import subprocess
import time
from datetime import datetime, timezone
from functools import partial

import pytest

from fake_discord import CANNED, WEBHOOK_TOKEN, FakeDiscord
from worker import discord
from worker.report import Settings, Sidecar
from worker.stash import Stash

from .conftest import AKM, rows, write_task

pytestmark = pytest.mark.fault


class SlowDiscord(FakeDiscord):
    """FakeDiscord plus ("slow", seconds): answer 204, but only after SECONDS."""

    def next_answer(self, body_errors):
        with self._lock:
            entry = self._script[0] if self._script else None
        if isinstance(entry, tuple) and entry[0] == "slow":
            with self._lock:
                self._script.pop(0)
            time.sleep(entry[1])
            return CANNED["ok"]
        return super().next_answer(body_errors)


@pytest.fixture
def fake():
    with SlowDiscord() as d:
        yield d


def _sidecar(stash, url, **post_kw):
    write_task(stash, "t", 'schedule: "@hourly"\ncommand: "echo ok"\n')
    settings = Settings.from_env({"DISCORD_WEBHOOK_URL": url})
    out = io.StringIO()
    car = Sidecar(Stash(stash), settings, post=partial(discord.post, **post_kw), out=out)
    return car, out


def _reports(stash):
    return rows(stash, "SELECT * FROM reports ORDER BY id")


def _no_token(*texts):
    for text in texts:
        assert WEBHOOK_TOKEN not in text


def test_hanging_endpoint_is_bounded_and_recorded(fake, stash):
    fake.script(*[("hang", 5)] * 3)
    car, out = _sidecar(stash, fake.url, timeout=1.0, max_attempts=3)
    t0 = time.monotonic()
    result = car.tick()
    took = time.monotonic() - t0
    # 3 attempts of 1 s plus the backoff between them (1 s, 2 s).
    assert took < 8, f"a hanging endpoint held the sidecar {took:.1f} s"
    assert result.outcome is discord.Outcome.NETWORK_ERROR and result.attempts == 3
    [rec] = _reports(stash)
    assert rec["outcome"] == "network_error" and rec["http_status"] is None
    _no_token(out.getvalue(), rec["detail"] or "")
    # The next tick, with the endpoint back, posts normally.
    assert car.tick().ok
    assert [r["outcome"] for r in _reports(stash)] == ["network_error", "ok"]


def test_slow_endpoint_within_the_timeout_succeeds(fake, stash):
    fake.script(("slow", 1.5))
    car, out = _sidecar(stash, fake.url, timeout=5.0)
    t0 = time.monotonic()
    result = car.tick()
    assert result.ok and result.attempts == 1
    assert 1.4 < time.monotonic() - t0 < 5
    assert [r["outcome"] for r in _reports(stash)] == ["ok"]


def test_slow_endpoint_past_the_timeout_is_a_bounded_network_error(fake, stash):
    fake.script(("slow", 3), ("slow", 3))
    car, out = _sidecar(stash, fake.url, timeout=1.0, max_attempts=2)
    t0 = time.monotonic()
    result = car.tick()
    assert result.outcome is discord.Outcome.NETWORK_ERROR
    assert time.monotonic() - t0 < 5
    _no_token(out.getvalue())


def test_429_forever_is_bounded(fake, stash):
    fake.script(*[("rate_limit", 0.5)] * 20)
    car, out = _sidecar(stash, fake.url, timeout=2.0)
    t0 = time.monotonic()
    result = car.tick()
    took = time.monotonic() - t0
    assert result.outcome is discord.Outcome.RATE_LIMITED and result.http_status == 429
    assert result.attempts == 4 and took < 10, (result, took)
    assert len(fake.requests) == 4
    [rec] = _reports(stash)
    assert rec["outcome"] == "rate_limited" and rec["http_status"] == 429
    _no_token(out.getvalue(), rec["detail"] or "")


def test_429_asking_for_an_hour_is_not_waited_for(fake, stash):
    fake.script(*[("rate_limit", 3600)] * 5)
    car, out = _sidecar(stash, fake.url, timeout=2.0)
    t0 = time.monotonic()
    result = car.tick()
    assert result.outcome is discord.Outcome.RATE_LIMITED
    assert time.monotonic() - t0 < 3


def test_akm_report_once_against_429_forever(fake, stash):
    """The real CLI, as the sidecar container runs it, end to end."""
    write_task(stash, "t", 'schedule: "@hourly"\ncommand: "echo ok"\n')
    fake.script(*[("rate_limit", 0.2)] * 20)
    full = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
    full.update(AKM_STASH=str(stash), DISCORD_WEBHOOK_URL=fake.url)
    t0 = time.monotonic()
    r = subprocess.run([AKM, "report", "--discord", "--once"], env=full, capture_output=True,
                       text=True, timeout=60)
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in r.stderr
    _no_token(r.stdout, r.stderr)
    assert "rate_limited" in r.stdout + r.stderr
    [rec] = _reports(stash)
    assert rec["outcome"] == "rate_limited"
    assert datetime.fromisoformat(rec["attempted_at"].replace("Z", "+00:00")) <= \
        datetime.now(timezone.utc)
