"""`akm report --discord`: the sidecar that posts the health report.

A second compose service from the same image, on the same stash volume. It
posts at each REPORT_SCHEDULE fire time (cron, in $TZ) and records every
post in state.db's `reports` table, where `akm health` sees a report that
keeps failing. It writes nothing else in the stash.

Settings (environment, read once at start):
  DISCORD_WEBHOOK_URL    where to post (a credential: never printed)
  REPORT_SCHEDULE        cron expression, default "0 * * * *" (hourly at :00)
  REPORT_ON_START=1      also post once at start
  REPORT_ONLY_PROBLEMS=1 post only when something is wrong
  REPORT_USERNAME        the name the message is posted under
  REPORT_WINDOW          how far back each report looks (default: the time
                         since the previous scheduled post, e.g. 1h)

A configuration problem (no URL, a bad schedule) is one clear line at start
and then the sidecar idles, repeating the line hourly: exiting would only
make Docker restart it in a loop, and the env cannot change without a
restart anyway.
"""

import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from . import clock, discord
from .discord import Outcome
from .errors import EXIT_OK, EXIT_PROBLEMS, AkmError, UsageError
from .stash import Stash

DEFAULT_SCHEDULE = "0 * * * *"
REPEAT_EVERY = 3600.0     # seconds between repeated lines about a lasting problem
TICK = 0.5                # the longest a stop request waits to be noticed
KEEP_REPORTS = timedelta(days=30)
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    url: str | None
    schedule: str
    on_start: bool
    only_problems: bool
    username: str | None
    window: timedelta | None
    problem: str | None       # why the sidecar cannot post (no URL, bad schedule)

    @classmethod
    def from_env(cls, env) -> "Settings":
        from .schedule import check, normalise
        schedule = normalise(env.get("REPORT_SCHEDULE") or DEFAULT_SCHEDULE)
        problem = discord.check_url(env.get("DISCORD_WEBHOOK_URL"))
        bad = check(schedule)
        if bad:
            problem = f"REPORT_SCHEDULE {schedule!r} {bad}"
        window = None
        if env.get("REPORT_WINDOW"):
            try:
                window = clock.parse_duration(env["REPORT_WINDOW"])
            except ValueError as e:
                problem = f"REPORT_WINDOW: {e}"
        return cls(url=(env.get("DISCORD_WEBHOOK_URL") or "").strip() or None,
                   schedule=schedule,
                   on_start=env.get("REPORT_ON_START", "").lower() in _TRUE,
                   only_problems=env.get("REPORT_ONLY_PROBLEMS", "").lower() in _TRUE,
                   username=env.get("REPORT_USERNAME") or None,
                   window=window, problem=problem)


class _Stop(Exception):
    """Raised out of a retry wait when SIGTERM arrives: a post is not worth a slow stop."""


class Sidecar:
    """The loop. Clock, sleep and post are parameters so tests run it fast."""

    def __init__(self, stash, settings, post=discord.post, now=None, sleep=time.sleep,
                 monotonic=time.monotonic, out=None, masker=None):
        self.stash, self.settings, self._post = stash, settings, post
        self.now = now or (lambda: datetime.now(timezone.utc))
        self._sleep, self.monotonic = sleep, monotonic
        self.out = out or sys.stdout
        self.masker = masker
        self.stop = False             # set by the signal handler, read by the loop
        self._gone_at = None          # monotonic time of the last 401/403/404
        self._last_due = None

    # -- the loop --------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        if s.problem:
            return self.idle(s.problem)
        self.log(f"posting to {discord.mask_url(s.url)} on schedule {s.schedule!r}"
                 + (", only when something is wrong" if s.only_problems else ""))
        if s.on_start:
            self._safe_tick()
        while not self.stop:
            due = self._next_due()
            if due is None:
                return self.idle(f"REPORT_SCHEDULE {s.schedule!r} never fires again")
            self.sleep_until(due)
            if not self.stop:
                self._safe_tick()
        self.log("stopping")
        return EXIT_OK

    def _safe_tick(self):
        # A bug in one report must not take the sidecar down into a restart
        # loop; the next tick may well work (AKM_DEBUG=1 shows the traceback).
        try:
            self.tick()
        except Exception as e:  # noqa: BLE001
            if os.environ.get("AKM_DEBUG") == "1":
                raise
            self.log(f"internal error while reporting: {type(e).__name__}: {e} "
                     f"(please report it)")

    def _next_due(self):
        from .schedule import next_fire
        due = next_fire(self.settings.schedule, self.now())
        # A wall clock stepped back must not post the same fire time twice.
        if due is not None and self._last_due is not None and due <= self._last_due:
            due = next_fire(self.settings.schedule, self._last_due)
        self._last_due = due
        return due

    def sleep_until(self, due: datetime):
        """Sleep to DUE by the monotonic clock, waking early for a stop request;
        the wall clock is checked too, so after a suspend the loop posts once
        and carries on from now instead of firing every missed tick."""
        deadline = self.monotonic() + max(0.0, (due - self.now()).total_seconds())
        while not self.stop:
            left = deadline - self.monotonic()
            if left <= 0 or self.now() >= due:
                return
            self._sleep(min(TICK, left))

    def idle(self, problem: str) -> int:
        self.log(f"cannot post: {problem}. Fix it in .env and restart this service; "
                 f"waiting (nothing is posted meanwhile)")
        self.record(discord.PostResult(Outcome.NOT_CONFIGURED, None, problem, 0))
        while not self.stop:
            self.sleep_until(self.now() + timedelta(seconds=REPEAT_EVERY))
            if not self.stop:
                self.log(f"still cannot post: {problem}")
                self.record(discord.PostResult(Outcome.NOT_CONFIGURED, None, problem, 0))
        return EXIT_OK

    # -- one post ----------------------------------------------------------------

    def tick(self) -> discord.PostResult | None:
        """Build the report and post it; None when nothing was posted."""
        if self._gone_at is not None and self.monotonic() - self._gone_at < REPEAT_EVERY:
            return None  # Discord asks callers not to hammer a dead webhook
        from .health import check
        now = self.now()
        try:
            report = check(self.stash, now, self.window(now))
        except AkmError as e:
            # No report is itself the news: an unreadable state.db stops everything.
            self.log(f"cannot build the report: {e}")
            report, body = None, discord.render_error(str(e), self.settings.username, self.masker)
        else:
            if self.settings.only_problems and report.ok:
                self.log("nothing wrong; not posting (REPORT_ONLY_PROBLEMS=1)")
                return None
            body = discord.render(report, self.settings.username, self.masker)
        try:
            result = self._post(self.settings.url, body, sleep=self._nap)
        except _Stop:
            return None
        self.record(result)
        self._log_result(result, report)
        self._gone_at = self.monotonic() if result.outcome is Outcome.GONE else None
        return result

    def window(self, now) -> timedelta:
        if self.settings.window:
            return self.settings.window
        from .schedule import next_fire, prev_fire
        before = prev_fire(self.settings.schedule, now + timedelta(seconds=1))
        after = next_fire(self.settings.schedule, before) if before else None
        return (after - before) if before and after else timedelta(hours=24)

    def _nap(self, seconds):
        end = self.monotonic() + seconds
        while self.monotonic() < end:
            if self.stop:
                raise _Stop()
            self._sleep(min(TICK, end - self.monotonic()))

    def _log_result(self, result, report):
        n = len(report.problems) if report else 0
        what = (f"{n} problem{'s' if n != 1 else ''}" if n else "all good") if report \
            else "no report: state.db unreadable"
        if result.ok:
            self.log(f"posted the report ({what}): {result.detail}")
        elif result.outcome is Outcome.GONE:
            self.log(f"WEBHOOK NOT USABLE, report not posted: {result.detail}; "
                     f"trying again in an hour")
        else:
            self.log(f"report not posted ({result.outcome}, {result.attempts} attempts): "
                     f"{result.detail}")

    # -- bookkeeping --------------------------------------------------------------

    def record(self, result):
        """One `reports` row per post (or per hour without a usable URL)."""
        from . import state
        now = self.now()
        detail = discord.scrub(result.detail, self.settings.url)
        try:
            conn = state.connect(self.stash)
            try:
                with conn:
                    conn.execute("INSERT INTO reports (attempted_at, outcome, http_status, detail)"
                                 " VALUES (?, ?, ?, ?)", (clock.iso_dt(now), str(result.outcome),
                                                          result.http_status, detail[:1000]))
                    conn.execute("DELETE FROM reports WHERE attempted_at < ?",
                                 (clock.iso_dt(now - KEEP_REPORTS),))
            finally:
                conn.close()
        except Exception as e:  # noqa: BLE001 - bookkeeping never stops the posting
            self.log(f"cannot record the post in {self.stash.state_db}: {e}")

    def log(self, message):
        text = discord.scrub(message, self.settings.url)
        self.out.write(f"{clock.iso()} akm report: {text}\n")
        self.out.flush()


def cmd_report(args) -> int:
    if not args.discord:
        raise UsageError("say where to post: `akm report --discord` (DISCORD_WEBHOOK_URL)")
    stash = Stash.resolve(args.stash)
    settings = Settings.from_env(os.environ)
    from .environment import Masker, secret_values
    sidecar = Sidecar(stash, settings, masker=Masker(secret_values(os.environ)))
    if args.once:
        if settings.problem:
            raise UsageError(settings.problem)
        result = sidecar.tick()
        return EXIT_PROBLEMS if result is not None and not result.ok else EXIT_OK

    def request_stop(signum, frame):
        # Only a flag: logging or I/O in a handler can deadlock on stdout's lock.
        sidecar.stop = True
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return sidecar.run()
