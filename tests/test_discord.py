"""The webhook body within Discord's limits, and post() against a real HTTP server."""

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from fake_discord import FakeDiscord, validate
from worker import discord
from worker.discord import Outcome, check_url, mask_url, post, render, scrub
from worker.environment import Masker
from worker.health import Kind, Problem, Report, TaskSummary

NOW = datetime(2026, 11, 25, 6, 0, tzinfo=timezone.utc)
URL = "https://discord.com/api/webhooks/123456789012345678/AbC-dEf_123.secretTOKEN"


def report(problems=(), tasks=()):
    return Report(NOW, timedelta(hours=1), list(problems), list(tasks))


def failed(i, detail="exit 1: boom", kind=Kind.FAILED):
    return Problem(f"task-{i}", kind, detail, run_id=1000 + i)


def summaries(n):
    return [TaskSummary(f"task-{i:04d}", True, "0 * * * *", runs=24, successes=24)
            for i in range(n)]


def total_embed_chars(body):
    n = 0
    for e in body["embeds"]:
        n += len(e.get("title", "")) + len(e.get("description", ""))
        n += len(e.get("footer", {}).get("text", ""))
        n += sum(len(f["name"]) + len(f["value"]) for f in e.get("fields", []))
    return n


# -- render ---------------------------------------------------------------------

def test_all_good_is_green_and_pings_nobody():
    body = render(report(tasks=summaries(3)))
    assert validate(body) == []
    assert body["embeds"][0]["color"] == discord.GREEN
    assert body["allowed_mentions"] == {"parse": []}
    assert "all good" in body["content"]


@pytest.mark.parametrize("kind,colour", [(Kind.LATE, discord.AMBER),
                                         (Kind.OVER_BUDGET, discord.AMBER),
                                         (Kind.REPORT_FAILING, discord.AMBER),
                                         (Kind.FAILED, discord.RED),
                                         (Kind.TIMEOUT, discord.RED),
                                         (Kind.ABANDONED, discord.RED)])
def test_colour_by_state(kind, colour):
    assert render(report([failed(1, kind=kind)]))["embeds"][0]["color"] == colour


def test_run_id_and_logs_command_are_in_the_message():
    body = render(report([failed(7)]))
    field = body["embeds"][0]["fields"][0]
    assert "failed" in field["name"] and "task-7" in field["name"]
    assert "`akm logs task-7 --run 1007`" in field["value"]


def test_many_long_problems_are_cut_with_and_n_more():
    problems = [failed(i, "x" * 3000) for i in range(100)]
    body = render(report(problems, summaries(400)))
    assert validate(body) == []
    assert total_embed_chars(body) <= 6000
    fields = body["embeds"][0]["fields"]
    shown = len(fields) - 1
    assert fields[-1]["name"] == f"…and {100 - shown} more"
    # A cut value still ends with the command to look closer.
    assert fields[0]["value"].endswith("`akm logs task-0 --run 1000`")
    assert len(fields[0]["value"]) <= 1024


def test_many_short_problems_stop_at_25_fields():
    body = render(report([failed(i) for i in range(40)]))
    fields = body["embeds"][0]["fields"]
    assert validate(body) == [] and len(fields) == 25
    assert fields[-1]["name"] == "…and 16 more"


def test_exactly_25_problems_need_no_more_field():
    fields = render(report([failed(i) for i in range(25)]))["embeds"][0]["fields"]
    assert len(fields) == 25 and "more" not in fields[-1]["name"]


def test_many_tasks_are_cut_with_and_n_more():
    body = render(report(tasks=summaries(1000)))
    assert validate(body) == []
    assert "…and " in body["embeds"][1]["description"]


def test_astral_characters_count_double():
    # Discord may count UTF-16 units; an emoji-heavy error must still fit.
    problems = [failed(i, "🔥" * 2000) for i in range(30)]
    body = render(report(problems, summaries(50)))
    assert validate(body) == []


def test_secrets_are_masked_and_mentions_are_inert():
    p = failed(1, "token sk-live-abcdef123456 rejected; @everyone look")
    body = render(report([p]), masker=Masker(["sk-live-abcdef123456"]))
    text = json.dumps(body)
    assert "sk-live-abcdef123456" not in text and "***" in text
    assert body["allowed_mentions"] == {"parse": []}


@pytest.mark.parametrize("name,expected", [("akm-worker", "akm-worker"),
                                           ("x" * 100, "x" * 80),
                                           ("My Discord bot", None), ("", None), (None, None)])
def test_username(name, expected):
    assert render(report(), username=name).get("username") == expected


# -- the URL never shows ---------------------------------------------------------

def test_check_url():
    assert check_url(URL) is None
    assert check_url("") == "DISCORD_WEBHOOK_URL is not set"
    assert "https://" in check_url("ftp://discord.com/api/webhooks/1/x")
    assert "does not look like" in check_url("https://discord.com/channels/1/2")
    assert check_url("https://discord.com/api/v10/webhooks/1/tok") is None


def test_mask_url_and_scrub_hide_the_token():
    masked = mask_url(URL)
    assert "secretTOKEN" not in masked and masked.endswith("/***")
    text = scrub(f"<urlopen error for {URL}> and again AbC-dEf_123.secretTOKEN", URL)
    assert "secretTOKEN" not in text


# -- post against the fake server -------------------------------------------------

@pytest.fixture
def fake():
    with FakeDiscord() as d:
        yield d


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


BODY = {"content": "hello", "allowed_mentions": {"parse": []}}


def test_204_is_ok(fake):
    result = post(fake.url, render(report([failed(1)], summaries(3))), sleep=Sleeps())
    assert result.ok and result.http_status == 204 and result.attempts == 1
    assert fake.requests[0]["errors"] == []
    assert fake.requests[0]["headers"]["Content-Type"] == "application/json"


def test_400_is_rejected_without_retry(fake):
    fake.script("bad_request")
    sleeps = Sleeps()
    result = post(fake.url, BODY, sleep=sleeps)
    assert result.outcome is Outcome.REJECTED and result.http_status == 400
    assert "Invalid Form Body (code 50035)" in result.detail
    assert "content: Must be 2000 or fewer in length." in result.detail
    assert len(fake.requests) == 1 and sleeps == []


def test_a_body_over_the_limits_gets_discords_400(fake):
    result = post(fake.url, {"content": "x" * 2001}, sleep=Sleeps())
    assert result.outcome is Outcome.REJECTED
    assert "Must be 2000 or fewer" in result.detail


def test_429_waits_retry_after_then_succeeds(fake):
    fake.script("rate_limit", "ok")
    sleeps = Sleeps()
    result = post(fake.url, BODY, sleep=sleeps)
    assert result.ok and result.attempts == 2
    assert sleeps == [0.5]                       # the body's float, not the header's 1


def test_429_header_only(fake):
    fake.script((429, None, {"Retry-After": "2"}), "ok")
    sleeps = Sleeps()
    assert post(fake.url, BODY, sleep=sleeps).ok and sleeps == [2.0]


def test_429_every_time_gives_up_after_max_attempts(fake):
    fake.script(*["rate_limit"] * 10)
    sleeps = Sleeps()
    result = post(fake.url, BODY, max_attempts=3, sleep=sleeps)
    assert result.outcome is Outcome.RATE_LIMITED and result.attempts == 3
    assert len(fake.requests) == 3 and sleeps == [0.5, 0.5]


def test_429_with_a_wait_too_long_is_not_honoured_in_this_post(fake):
    fake.script(("rate_limit", 1336.57, 1337))
    sleeps = Sleeps()
    result = post(fake.url, BODY, sleep=sleeps)
    assert result.outcome is Outcome.RATE_LIMITED and sleeps == []
    assert "1336.57" in result.detail


def test_500_backs_off_then_succeeds(fake):
    fake.script("server_error", "bad_gateway", "ok")
    sleeps = Sleeps()
    result = post(fake.url, BODY, sleep=sleeps)
    assert result.ok and result.attempts == 3 and sleeps == [1.0, 2.0]


def test_500_every_time_is_bounded(fake):
    fake.script(*["server_error"] * 10)
    result = post(fake.url, BODY, max_attempts=4, sleep=Sleeps())
    assert result.outcome is Outcome.SERVER_ERROR and result.http_status == 500
    assert len(fake.requests) == 4


@pytest.mark.parametrize("entry,status", [("not_found", 404), ("unauthorized", 401),
                                          ("forbidden", 403)])
def test_dead_webhook_stops_at_once(fake, entry, status):
    fake.script(entry)
    sleeps = Sleeps()
    result = post(fake.url, BODY, sleep=sleeps)
    assert result.outcome is Outcome.GONE and result.http_status == status
    assert len(fake.requests) == 1 and sleeps == []
    assert "deleted or its token is wrong" in result.detail
    assert fake.token not in result.detail and fake.url not in result.detail


def test_wrong_token_is_401_from_the_server(fake):
    result = post(fake.url.replace(fake.token, "wrongtoken"), BODY, sleep=Sleeps())
    assert result.outcome is Outcome.GONE and result.http_status == 401
    assert "Invalid Webhook Token" in result.detail and "wrongtoken" not in result.detail


def test_a_hanging_server_times_out_and_is_bounded(fake):
    fake.script(("hang", 2), ("hang", 2))
    started = time.monotonic()
    result = post(fake.url, BODY, timeout=0.3, max_attempts=2, sleep=Sleeps())
    assert result.outcome is Outcome.NETWORK_ERROR and result.attempts == 2
    assert "no answer within 0.3s" in result.detail
    assert time.monotonic() - started < 1.5


def test_connection_refused_never_shows_the_url():
    with FakeDiscord() as d:
        url = d.url
    sleeps = Sleeps()
    result = post(url, BODY, max_attempts=2, sleep=sleeps)
    assert result.outcome is Outcome.NETWORK_ERROR and sleeps == [1.0]
    assert "fake-token" not in result.detail


def test_malformed_url_is_not_posted():
    result = post("not a url", BODY, sleep=Sleeps())
    assert result.outcome is Outcome.NOT_CONFIGURED and result.attempts == 0


def test_the_token_is_scrubbed_from_the_body(fake):
    post(fake.url, {"content": f"a task printed {fake.url}"}, sleep=Sleeps())
    assert fake.token not in fake.requests[0]["body"]["content"]


def test_the_fake_server_runs_as_a_program_for_other_processes():
    # The image test runs it this way: another process scripts it over HTTP.
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_discord.py"))],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        base = url.split("/api/")[0]
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/_control/script", data=b'["not_found"]', method="POST"), timeout=5)
        assert post(url, BODY, sleep=Sleeps()).outcome is Outcome.GONE
        assert post(url, BODY, sleep=Sleeps()).ok
        with urllib.request.urlopen(f"{base}/_control/requests", timeout=5) as r:
            assert [x["body"] for x in json.load(r)] == [BODY, BODY]
    finally:
        proc.terminate()
        proc.wait(timeout=5)
