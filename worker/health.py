"""`akm health`: what went wrong, from state.db and the task files.

`check(stash, now, window)` returns a Report (plain data); `cmd_health`
prints it as text, JSON or a Discord webhook body. The clock is read once,
by the caller, so every decision in one report agrees on "now" and tests
travel in time by passing it.

Problems are grouped: one per task and kind, with how many runs it covers
and the newest run's id (an every-5-minutes task failing all day is one
line that says 288, not 288 lines).

Speed: every query walks an index (see state.py). The per-task figures and
run problems come from state's hourly rollup (run_hours) for the window's
whole hours and from raw rows only for its two partial edge hours and
`running` rows; runs over budget are counted from a covering index, only in
hours whose largest run exceeds today's budget. (task_id, started_at) finds a
task's newest run; the partial index finds `running` rows. bench/run.py: a
24 h window holding 500k of 1M rows answers in ~0.18 s (was ~0.6 s).
"""

import os
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path

from . import clock, state
from .errors import EXIT_OK, EXIT_PROBLEMS, StateError
from .stash import Stash


class Kind(StrEnum):
    FAILED = "failed"
    TIMEOUT = "timeout"
    ERROR = "error"
    ABANDONED = "abandoned"
    INVALID = "invalid"
    RUNNING_LONG = "running_long"
    OVER_BUDGET = "over_budget"
    LATE = "late"
    REPORT_FAILING = "report_failing"


# Red: a run did not do its job (or cannot). Amber: it did, but look at it.
RED = frozenset({Kind.FAILED, Kind.TIMEOUT, Kind.ERROR, Kind.ABANDONED, Kind.INVALID,
                 Kind.RUNNING_LONG})
RUN_KINDS = (Kind.FAILED, Kind.TIMEOUT, Kind.ERROR, Kind.ABANDONED)  # = their run status

LATE_GRACE_MIN = 60.0        # seconds; a cron tick plus a slow container start
LATE_GRACE_SHARE = 0.10      # of the schedule's interval
LATE_GRACE_MAX = 3600.0      # a weekly task is not allowed to be 17 hours late
RUNNING_GRACE = 60.0         # past the timeout, before a running run is "long"
REPORT_FAILING_AFTER = timedelta(hours=3)
UNKNOWN_TASK_TIMEOUT = 300.0


@dataclass(frozen=True)
class Problem:
    task: str | None         # None for report_failing (not about one task)
    kind: Kind
    detail: str
    run_id: int | None = None

    @property
    def logs_command(self) -> str | None:
        if self.task and self.run_id is not None:
            return f"akm logs {self.task} --run {self.run_id}"
        return None

    @property
    def command(self) -> str | None:
        """What to type to look closer: the run's log, else the kind's own look."""
        if self.logs_command:
            return self.logs_command
        return {Kind.LATE: f"akm runs --task {self.task}",
                Kind.INVALID: "akm tasks validate",
                Kind.REPORT_FAILING: "docker compose logs report"}.get(self.kind)

    def as_json(self) -> dict:
        return {"task": self.task, "kind": str(self.kind), "detail": self.detail,
                "run_id": self.run_id}


@dataclass
class TaskSummary:
    task: str
    enabled: bool | None     # None: runs recorded but no task file any more
    schedule: str | None
    runs: int = 0
    successes: int = 0
    failures: int = 0        # failed + timeout + error + abandoned
    tokens: int = 0
    cost_usd: float = 0.0
    last_status: str | None = None
    last_run_id: int | None = None
    last_started_at: str | None = None
    next_run: str | None = None


@dataclass
class Report:
    generated_at: datetime
    window: timedelta
    problems: list[Problem] = field(default_factory=list)
    tasks: list[TaskSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"ok": self.ok, "generated_at": clock.iso_dt(self.generated_at),
                "window": window_label(self.window),
                "problems": [p.as_json() for p in self.problems],
                "tasks": [asdict(t) for t in self.tasks]}


def window_label(window: timedelta) -> str:
    """24h, 30m, 2d, 90s: the form --window takes, largest whole unit."""
    s = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0 and (unit != "d" or s >= 2 * 86400):
            return f"{s // size}{unit}"
    return f"{s}s"


def severity(report: Report) -> str:
    """green, amber or red: the colour of the whole report."""
    if any(p.kind in RED for p in report.problems):
        return "red"
    return "amber" if report.problems else "green"


# -- the check ----------------------------------------------------------------

def check(stash: Stash, now: datetime, window: timedelta, tz=None) -> Report:
    """The health Report at NOW over the WINDOW before it. Reads; writes only
    the abandoned marking (state.mark_abandoned) into an existing state.db."""
    from .schedule import zone
    from .taskfile import load_all
    tz = zone(tz)  # $TZ by default, as supercronic reads it
    tasks, invalid = load_all(stash)
    report = Report(generated_at=now, window=window)
    report.problems += [_invalid(stash, e) for e in invalid]
    try:
        conn = _open(stash)
        try:
            _from_db(report, conn, tasks, tz)
        finally:
            if conn is not None:
                conn.close()
    except sqlite3.DatabaseError as e:
        raise StateError(f"cannot read {stash.state_db}: {e} (if it is corrupted, move "
                         f"it aside; the worker starts a new one)") from None
    report.problems.sort(key=lambda p: (list(Kind).index(p.kind), p.task or ""))
    return report


def _open(stash):
    """state.db, or None when there is none yet (a read never creates it)."""
    from . import state
    if not stash.state_db.exists():
        return None
    conn = state.connect(stash)
    try:
        state.mark_abandoned(conn, stash)
    except sqlite3.OperationalError:
        pass  # a read-only state.db (someone else's file): report what is there
    return conn


def _from_db(report, conn, tasks, tz):
    db = _Db(conn, report.generated_at, report.window)
    by_id = {t.id: t for t in tasks}
    summaries = {t.id: TaskSummary(t.id, t.enabled, t.schedule) for t in tasks}
    for row in db.window({t.id: t.token_budget for t in tasks if t.token_budget}):
        s = summaries.setdefault(row["task_id"], TaskSummary(row["task_id"], None, None))
        s.runs, s.successes = row["runs"], row["successes"]
        s.failures = sum(row[f"n_{k}"] for k in RUN_KINDS)
        s.tokens, s.cost_usd = int(row["tokens"]), round(row["cost"], 6)
        report.problems += db.window_problems(row, by_id.get(s.task))
    for s in summaries.values():
        last = db.last_run(s.task)
        if last:
            s.last_status, s.last_run_id, s.last_started_at = (
                last["status"], last["id"], last["started_at"])
    report.problems += db.running_long(by_id)
    started = db.meta("scheduler_started_at")
    for t in tasks:
        s = summaries[t.id]
        late = late_problem(t, s.last_started_at, started, report.generated_at, tz)
        if late:
            report.problems.append(late)
        if t.enabled:
            nxt = _fire(t.schedule, report.generated_at, tz, "next")
            s.next_run = clock.iso_dt(nxt) if nxt else None
    failing = db.report_failing()
    if failing:
        report.problems.append(failing)
    report.tasks = sorted(summaries.values(), key=lambda s: s.task)


def _invalid(stash, e) -> Problem:
    # The path relative to the stash: the same words on the host and in the container.
    text = str(e)
    if text.startswith(e.path):
        text = stash.relative(e.path) + text[len(e.path):]
    return Problem(Path(e.path).stem, Kind.INVALID, text)


class _Db:
    """The queries, each bounded by an index. CONN is None for a stash with no state.db."""

    def __init__(self, conn, now, window):
        self.conn = conn
        self.now = clock.iso_dt(now)
        self.since = clock.iso_dt(now - window)
        self.now_dt = now
        self.label = window_label(window)

    def _rows(self, sql, params=()):
        return self.conn.execute(sql, params).fetchall() if self.conn else []

    def window(self, budgets: dict):
        """Every per-task figure of the window: totals, a count and newest id
        per failure kind, and the runs over the task's CURRENT budget.

        Whole hours come from state.run_hours (one row per task and hour);
        only the partial hours at the window's two edges, and `running` rows
        (not in the rollup), are read from runs. Same figures as one GROUP BY
        over the window's runs, at a cost that follows hours, not runs."""
        if not self.conn:
            return []
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS budgets "
                          "(task_id TEXT PRIMARY KEY, budget INTEGER) WITHOUT ROWID")
        self.conn.execute("DELETE FROM temp.budgets")
        self.conn.executemany("INSERT INTO temp.budgets VALUES (?, ?)", budgets.items())
        first, last = self.since[:13], self.now[:13]  # 'YYYY-MM-DDTHH', as run_hours.hour
        if first == last:  # inside one hour: its raw rows are few
            return self._merge(self._raw("r.started_at >= ? AND r.started_at <= ?",
                                         (self.since, self.now)))
        # A started_at sorts before its hour + '~' and after the hour itself.
        parts = self._raw("r.started_at >= ? AND r.started_at < ?", (self.since, first + "~"))
        parts += self._raw("r.started_at >= ? AND r.started_at <= ?", (last, self.now))
        whole = (first + "~", last)  # the hours strictly between the edges
        # `running` rows are not in run_hours; +started_at: the partial index.
        parts += self._raw("r.status = 'running' AND +r.started_at > ? AND +r.started_at < ?",
                           whole)
        parts += self._hours(whole)
        parts += self._over_budget(whole)
        return self._merge(parts)

    _COUNTS = ("runs", "successes", "tokens", "cost", *(f"n_{k}" for k in RUN_KINDS),
               "n_over_budget")
    _IDS = (*(f"id_{k}" for k in RUN_KINDS), "id_over_budget")

    def _merge(self, parts):
        """One row per task: the counts added, the newest ids kept."""
        out = {}
        for p in parts:
            row = out.setdefault(p["task_id"], dict.fromkeys((*self._COUNTS, *self._IDS), 0))
            row["task_id"] = p["task_id"]
            for k in p.keys():
                if k in self._COUNTS:
                    row[k] += p[k] or 0
                elif k in self._IDS:
                    row[k] = max(row[k], p[k] or 0)
        for row in out.values():  # 0 is "none", as NULL is in the raw query
            for k in self._IDS:
                row[k] = row[k] or None
        return [out[t] for t in sorted(out)]

    def _raw(self, where, params):
        tokens = "coalesce(r.prompt_tokens, 0) + coalesce(r.completion_tokens, 0)"
        per_kind = "".join(f", sum(r.status = '{k}') AS n_{k}, "
                           f"max(CASE WHEN r.status = '{k}' THEN r.id END) AS id_{k}"
                           for k in RUN_KINDS)
        return self._rows(
            "SELECT r.task_id, count(*) AS runs, sum(r.status = 'success') AS successes, "
            f"total({tokens}) AS tokens, total(r.cost_usd) AS cost{per_kind}, "
            f"sum({tokens} > b.budget) AS n_over_budget, "
            f"max(CASE WHEN {tokens} > b.budget THEN r.id END) AS id_over_budget "
            "FROM runs r LEFT JOIN temp.budgets b ON b.task_id = r.task_id "
            f"WHERE {where} GROUP BY r.task_id", params)

    def _hours(self, whole):
        per_kind = "".join(f", sum(n_{k}) AS n_{k}, max(id_{k}) AS id_{k}" for k in RUN_KINDS)
        runs = " + ".join(f"n_{k}" for k in (*state.HOUR_KINDS, "skipped", "interrupted"))
        return self._rows(
            f"SELECT task_id, sum({runs}) AS runs, sum(n_success) AS successes, "
            f"total(tokens) AS tokens, total(cost) AS cost{per_kind}, "
            "0 AS n_over_budget, 0 AS id_over_budget "
            "FROM run_hours WHERE hour > ? AND hour < ? GROUP BY task_id", whole)

    def _over_budget(self, whole):
        # Judged against today's budget, so not rolled up: an hour whose
        # largest run is within it has none; only the others read their rows,
        # from state's runs_task_started_tokens index (status and the token
        # expression exactly as it has them).
        tokens = "coalesce(r.prompt_tokens, 0) + coalesce(r.completion_tokens, 0)"
        return self._rows(
            "SELECT r.task_id, count(*) AS n_over_budget, max(r.id) AS id_over_budget "
            "FROM run_hours h JOIN temp.budgets b ON b.task_id = h.task_id "
            "JOIN runs r ON r.task_id = h.task_id AND r.started_at > h.hour "
            "AND r.started_at < h.hour || '~' "
            "WHERE h.hour > ? AND h.hour < ? AND h.max_tokens > b.budget "
            f"AND r.status != 'running' AND {tokens} > b.budget GROUP BY r.task_id", whole)

    def window_problems(self, row, task) -> list[Problem]:
        """failed/timeout/error/abandoned/over_budget for one task's window row."""
        out = []
        for kind in RUN_KINDS:
            if row[f"n_{kind}"]:
                run = self.run(row[f"id_{kind}"])
                out.append(Problem(row["task_id"], kind,
                                   _run_detail(row[f"n_{kind}"], run, self.label), run["id"]))
        if row["n_over_budget"]:
            run = self.run(row["id_over_budget"])
            used = (run["prompt_tokens"] or 0) + (run["completion_tokens"] or 0)
            detail = (f"{_times(row['n_over_budget'])} over the budget of "
                      f"{task.token_budget:,} tokens in the last {self.label}; "
                      f"latest: run {run['id']} used {used:,}")
            out.append(Problem(row["task_id"], Kind.OVER_BUDGET, detail, run["id"]))
        return out

    def run(self, run_id):
        return self._rows("SELECT * FROM runs WHERE id = ?", (run_id,))[0]

    def last_run(self, task_id):
        rows = self._rows(
            "SELECT id, status, started_at FROM runs WHERE task_id = ? AND started_at <= ? "
            "ORDER BY started_at DESC, id DESC LIMIT 1", (task_id, self.now))
        return rows[0] if rows else None

    def running_long(self, by_id) -> list[Problem]:
        out = []
        for r in self._rows("SELECT id, task_id, started_at FROM runs WHERE status = 'running'"):
            task = by_id.get(r["task_id"])
            timeout = task.timeout if task else UNKNOWN_TASK_TIMEOUT
            grace = task.grace if task and task.grace is not None else RUNNING_GRACE
            ran = (self.now_dt - clock.parse_iso(r["started_at"])).total_seconds()
            if ran > timeout + grace:
                out.append(Problem(r["task_id"], Kind.RUNNING_LONG,
                                   f"run {r['id']} has been running for {human(ran)}, past its "
                                   f"timeout of {human(timeout)}; the runner did not stop it",
                                   r["id"]))
        return out

    def meta(self, key):
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def report_failing(self) -> Problem | None:
        if not self.conn:
            return None
        return report_failing(self.conn, self.now_dt)


def report_failing(conn, now: datetime) -> Problem | None:
    """The Discord report has failed for REPORT_FAILING_AFTER with no success since.

    Public so the scheduler can log it too (one cheap query on `reports`).
    """
    now_iso = clock.iso_dt(now)
    last_ok = conn.execute("SELECT max(attempted_at) FROM reports WHERE outcome = 'ok' "
                           "AND attempted_at <= ?", (now_iso,)).fetchone()[0]
    first, n, last_id = conn.execute(
        "SELECT min(attempted_at), count(*), max(id) FROM reports "
        "WHERE outcome != 'ok' AND attempted_at > ? AND attempted_at <= ?",
        (last_ok or "", now_iso)).fetchone()
    if not first or now - clock.parse_iso(first) < REPORT_FAILING_AFTER:
        return None
    last = conn.execute("SELECT outcome, detail FROM reports WHERE id = ?", (last_id,)).fetchone()
    detail = (f"Discord reports failing for {human((now - clock.parse_iso(first)).total_seconds())}"
              f" ({_times(n)}); last: {last[1] or last[0]}")
    return Problem(None, Kind.REPORT_FAILING, detail)


def _run_detail(n, run, label) -> str:
    what = {"failed": f"exit {run['exit_code']}", "timeout": "killed at its timeout",
            "error": "could not start", "abandoned": "the runner vanished"}[run["status"]]
    if run["signal"]:
        what += f" (signal {run['signal']})"
    error = (run["error"] or "").splitlines()[0][:300] if run["error"] else ""
    if run["status"] == "abandoned" and error:
        what = "the runner vanished" if "vanished" not in error else "abandoned"
    head = f"{_times(n)} in the last {label}; latest: run {run['id']} at {_short(run['started_at'])}"
    return f"{head}, {what}" + (f": {error}" if error else "")


def _times(n) -> str:
    return "once" if n == 1 else f"{n} times"


def _short(iso_text) -> str:
    return clock.parse_iso(iso_text).strftime("%Y-%m-%d %H:%M UTC")


# -- late ---------------------------------------------------------------------

def late_problem(task, last_started, scheduler_started, now, tz) -> Problem | None:
    """LATE if the first fire after the task's last start (or, for a task that
    never ran, after its file appeared or the worker started) is past grace."""
    if not task.enabled:
        return None
    since = _since(task, last_started, scheduler_started)
    due = _fire(task.schedule, since, tz, "next")
    if due is None or due >= now:
        return None
    grace = late_grace(task, due, tz)
    if now < due + timedelta(seconds=grace):
        return None
    late_by = (now - due).total_seconds()
    last = f"last run started {_short(last_started)}" if last_started else "it has never run"
    detail = (f"expected at {_local(due, tz)}, {human(late_by)} late "
              f"(grace {human(grace)}); {last}")
    return Problem(task.id, Kind.LATE, detail)


def _since(task, last_started, scheduler_started) -> datetime:
    # Editing a task file resets what is expected of it; a task that never ran
    # is expected only from when both its file and the worker existed.
    candidates = [_mtime(task.path)]
    if last_started:
        candidates.append(clock.parse_iso(last_started))
    elif scheduler_started:
        candidates.append(clock.parse_iso(scheduler_started))
    return max(candidates)


def late_grace(task, due, tz) -> float:
    """Seconds: the task's `grace`, else 10% of its interval, within 1 min..1 h."""
    if task.grace is not None:
        return float(task.grace)
    after = _fire(task.schedule, due, tz, "next")
    interval = (after - due).total_seconds() if after else 0.0
    return min(max(LATE_GRACE_MIN, LATE_GRACE_SHARE * interval), LATE_GRACE_MAX)


def _fire(expr, at, tz, which):
    from . import schedule
    try:
        fn = schedule.next_fire if which == "next" else schedule.prev_fire
        return fn(expr, at, tz)
    except (ValueError, KeyError, StopIteration):
        return None  # a schedule that never fires again (a past year)


def _mtime(path) -> datetime:
    try:
        return datetime.fromtimestamp(Path(path).stat().st_mtime, timezone.utc)
    except OSError:
        return datetime.fromtimestamp(0, timezone.utc)


def _local(dt, tz) -> str:
    if getattr(tz, "key", "UTC") in ("UTC", "Etc/UTC"):
        return dt.strftime("%Y-%m-%d %H:%M UTC")
    return f"{dt.astimezone(tz):%Y-%m-%d %H:%M %Z} ({dt:%H:%M} UTC)"


def human(seconds: float) -> str:
    """45s, 6m, 5m 30s, 2h 5m, 3d 4h: two units at most."""
    s = int(round(seconds))
    for big, size, small, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{big}" + (f" {rest}{small}" if rest else "")
    return f"{s}s"


# -- the command --------------------------------------------------------------

def cmd_health(args) -> int:
    window = clock.duration_option("--window", args.window)
    stash = Stash.resolve(args.stash)
    report = check(stash, datetime.now(timezone.utc), window)
    if args.format == "json":
        import json
        print(json.dumps(report.as_json(), indent=2, ensure_ascii=False))
    elif args.format == "discord":
        import json
        from .discord import render
        from .environment import Masker, secret_values
        body = render(report, os.environ.get("REPORT_USERNAME"),
                      Masker(secret_values(os.environ)))
        print(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        print(render_text(report), end="")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


# -- text, for people at an 80-column terminal --------------------------------

WIDTH = 80
_COLUMNS = (("TASK", 16, "<"), ("RUNS", 4, ">"), ("OK", 4, ">"), ("FAIL", 4, ">"),
            ("TOKENS", 6, ">"), ("COST", 6, ">"), ("LAST", 21, "<"), ("NEXT", 11, "<"))


def render_text(report: Report) -> str:
    import textwrap
    window = window_label(report.window)
    n = len(report.problems)
    head = (f"akm health: {n} problem{'s' if n != 1 else ''}" if n else "akm health: OK")
    lines = [f"{head} (last {window}, at {report.generated_at:%Y-%m-%d %H:%M} UTC)", ""]
    if report.problems:
        lines.append("PROBLEMS")
        for p in report.problems:
            lines.append(f"{p.kind:<14} {p.task or '(discord report)'}"
                         + (f"  run {p.run_id}" if p.run_id is not None else ""))
            lines += textwrap.wrap(p.detail, WIDTH, initial_indent="  ",
                                   subsequent_indent="  ", break_on_hyphens=False)
            if p.command:
                lines.append(f"  see: {p.command}")
        lines.append("")
    if report.tasks:
        lines.append(_row([c[0] for c in _COLUMNS]))
        lines += [_row(_task_cells(t)) for t in report.tasks]
    else:
        lines.append("no tasks in tasks/ and no runs recorded")
    return "\n".join(lines) + "\n"


def _task_cells(t: TaskSummary) -> list[str]:
    last = f"{t.last_status} {_compact(t.last_started_at)}" if t.last_status else "never"
    nxt = _compact(t.next_run) if t.next_run else ("disabled" if t.enabled is False else "-")
    return [t.task, str(t.runs), str(t.successes), str(t.failures), _qty(t.tokens),
            f"${t.cost_usd:.2f}" if t.cost_usd < 1000 else f"${t.cost_usd:.0f}", last, nxt]


def _row(cells) -> str:
    out = []
    for cell, (_, width, align) in zip(cells, _COLUMNS):
        cell = cell if len(cell) <= width else cell[:width - 1] + "~"
        out.append(f"{cell:{align}{width}}")
    return " ".join(out).rstrip()


def _compact(iso_text) -> str:
    return clock.parse_iso(iso_text).strftime("%m-%d %H:%M")


def _qty(n) -> str:
    n = int(n)
    for size, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < size * 100 else f"{n // size}{unit}"
    return str(n)
