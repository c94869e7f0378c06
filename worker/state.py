"""state.db: one row per run, written before the command starts.

SQLite in WAL mode so the sidecar and people with `sqlite3` read while runs
write; a long busy timeout so a hundred runs starting in the same second all
get their row. The schema is versioned with PRAGMA user_version; MIGRATIONS
only ever grows, and each step keeps the rows already there.
"""

import fcntl
import json
import os
import sqlite3
import time

from . import clock
from .errors import StateError

BUSY_TIMEOUT_MS = 30_000
STATUSES = ("running", "success", "failed", "timeout", "error",
            "skipped", "interrupted", "abandoned")
FINAL = STATUSES[1:]

MIGRATIONS = [
    # 1: runs, meta, reports
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        trigger TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        exit_code INTEGER,
        signal INTEGER,
        stdout TEXT,
        stderr TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        cost_usd REAL,
        model TEXT,
        tools TEXT,
        error TEXT,
        log_path TEXT,
        runner TEXT
    );
    CREATE INDEX runs_task_started ON runs (task_id, started_at);
    CREATE INDEX runs_started ON runs (started_at);
    CREATE INDEX runs_running ON runs (status) WHERE status = 'running';
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE reports (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        attempted_at TEXT NOT NULL,
        outcome TEXT NOT NULL,
        http_status INTEGER,
        detail TEXT
    );
    CREATE INDEX reports_attempted ON reports (attempted_at);
    """,
]

# 2: run_hours, an hourly per-task rollup of finished runs, so `akm health`
# reads one row per task and hour instead of every run of its window. Kept by
# triggers, so every writer (the runner, mark_abandoned, a person with
# `sqlite3`) keeps it exact in its own transaction; prune recomputes it.
# hour = substr(started_at, 1, 13), 'YYYY-MM-DDTHH'; an id_* is the newest
# run of that status in the hour, 0 for none; tokens are prompt + completion.
# runs_task_started_tokens lets health count the runs over a budget in an
# hour from the index alone (budgets change, so that is not rolled up).
HOUR_KINDS = ("success", "failed", "timeout", "error", "abandoned")  # with a newest id
_TOKENS = "coalesce({0}prompt_tokens, 0) + coalesce({0}completion_tokens, 0)"
_HOUR_COLUMNS = ("task_id, hour, " + "".join(f"n_{k}, id_{k}, " for k in HOUR_KINDS)
                 + "n_skipped, n_interrupted, tokens, cost, max_tokens")


def _hour_values(new):
    """The rollup of one run (NEW. in a trigger) or of a GROUP BY (new='')."""
    if new:
        one = [f"NEW.status = '{k}', CASE WHEN NEW.status = '{k}' THEN NEW.id ELSE 0 END"
               for k in HOUR_KINDS]
        return (f"NEW.task_id, substr(NEW.started_at, 1, 13), {', '.join(one)}, "
                "NEW.status = 'skipped', NEW.status = 'interrupted', "
                f"{_TOKENS.format('NEW.')}, coalesce(NEW.cost_usd, 0.0), {_TOKENS.format('NEW.')}")
    many = [f"sum(status = '{k}'), coalesce(max(CASE WHEN status = '{k}' THEN id END), 0)"
            for k in HOUR_KINDS]
    return (f"task_id, substr(started_at, 1, 13), {', '.join(many)}, sum(status = 'skipped'), "
            f"sum(status = 'interrupted'), sum({_TOKENS.format('')}), total(cost_usd), "
            f"max({_TOKENS.format('')})")


def rollup_select(where: str) -> str:
    """SELECT the run_hours rows of the finished runs matching WHERE."""
    return (f"SELECT {_hour_values('')} FROM runs WHERE status != 'running' AND ({where}) "
            "GROUP BY task_id, substr(started_at, 1, 13)")


_BUMP = (f"INSERT INTO run_hours ({_HOUR_COLUMNS}) VALUES ({_hour_values('NEW.')}) "
         "ON CONFLICT (task_id, hour) DO UPDATE SET "
         + "".join(f"n_{k} = n_{k} + excluded.n_{k}, id_{k} = max(id_{k}, excluded.id_{k}), "
                   for k in HOUR_KINDS)
         + "n_skipped = n_skipped + excluded.n_skipped, "
         "n_interrupted = n_interrupted + excluded.n_interrupted, "
         "tokens = tokens + excluded.tokens, cost = cost + excluded.cost, "
         "max_tokens = max(max_tokens, excluded.max_tokens)")

MIGRATIONS.append(f"""
    CREATE TABLE run_hours (
        task_id TEXT NOT NULL,
        hour TEXT NOT NULL,
        {''.join(f"n_{k} INTEGER NOT NULL, id_{k} INTEGER NOT NULL, " for k in HOUR_KINDS)}
        n_skipped INTEGER NOT NULL,
        n_interrupted INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        cost REAL NOT NULL,
        max_tokens INTEGER NOT NULL,
        PRIMARY KEY (task_id, hour)
    ) WITHOUT ROWID;
    CREATE INDEX run_hours_hour ON run_hours (hour);
    CREATE INDEX runs_task_started_tokens
        ON runs (task_id, started_at, ({_TOKENS.format('')})) WHERE status != 'running';
    INSERT INTO run_hours ({_HOUR_COLUMNS}) {rollup_select('1')};
    CREATE TRIGGER run_hours_insert AFTER INSERT ON runs WHEN NEW.status != 'running'
    BEGIN {_BUMP}; END;
    CREATE TRIGGER run_hours_finish AFTER UPDATE OF status ON runs
    WHEN OLD.status = 'running' AND NEW.status != 'running'
    BEGIN {_BUMP}; END;
    """)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(stash, readonly: bool = False) -> sqlite3.Connection | None:
    """Open (and, for writers, create or migrate) the stash's state.db.

    A reader gets None when there is no state.db yet: a fresh stash has no
    runs, and reading must not create files on the volume.
    """
    path = stash.state_db
    try:
        if readonly:
            if not path.exists():
                return None
            from urllib.parse import quote  # a path with ? or # in it stays a path
            conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        else:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{path} has schema version {version}, newer than this "
                             f"akm-worker ({SCHEMA_VERSION}): upgrade the image")
        if not readonly:
            _prepare(conn, version)
        elif version == 0:
            conn.close()
            return None  # being created by a first run right now: no runs yet
        return conn
    except sqlite3.DatabaseError as e:
        raise StateError(_explain(path, e)) from None


def _explain(path, e) -> str:
    text = str(e)
    if "not a database" in text or "malformed" in text:
        return (f"{path} is corrupted ({text}); move it aside and akm starts a new one "
                f"(see README, Troubleshooting)")
    if "readonly" in text or "unable to open" in text:
        return (f"cannot write {path} ({text}): make the stash writable by the worker's "
                f"user (PUID/PGID)")
    return f"{path}: {text}"


def _prepare(conn, version):
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        _retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"))
    # In WAL, NORMAL survives a crash of any process (only power loss can
    # drop the last commits) and saves an fsync per run.
    conn.execute("PRAGMA synchronous = NORMAL")
    if version < SCHEMA_VERSION:
        _migrate(conn)


def _retry_busy(fn, attempts=200):
    # Switching to WAL takes an exclusive lock and does not always wait on the
    # busy handler; a hundred runs creating the database at once retry here.
    for i in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or i == attempts - 1:
                raise
            time.sleep(0.01 + i * 0.002)


def _migrate(conn):
    conn.isolation_level = None
    _retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"))
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"state.db has schema version {version}, newer than this "
                             f"akm-worker ({SCHEMA_VERSION}): upgrade the image")
        for step in MIGRATIONS[version:]:
            statement = ""
            for piece in step.split(";"):  # a trigger's body holds ";" too
                statement += piece + ";"
                if sqlite3.complete_statement(statement):
                    if statement.strip(" \n;"):
                        conn.execute(statement)
                    statement = ""
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.isolation_level = ""


# -- runs -----------------------------------------------------------------

def start_run(conn, task_id, trigger, status, started_at, runner=None,
              log_path_for=None, **fields) -> int:
    """Insert a run and return its id, in one transaction.

    LOG_PATH_FOR(run_id) names the log file, which carries the run id.
    """
    cols = {"task_id": task_id, "trigger": trigger, "status": status,
            "started_at": started_at, "runner": runner, **fields}
    with conn:
        cur = conn.execute(
            f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            list(cols.values()))
        run_id = cur.lastrowid
        if log_path_for:
            conn.execute("UPDATE runs SET log_path = ? WHERE id = ?",
                         (log_path_for(run_id), run_id))
    return run_id


def finish_run(conn, run_id, **fields):
    """Write a run's outcome and bookkeeping in one transaction."""
    sets = ", ".join(f"{k} = ?" for k in fields)
    with conn:
        conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*fields.values(), run_id])


def get_run(conn, run_id):
    return conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()


def list_runs(conn, task=None, status=None, limit=20):
    where, params = [], []
    if task:
        where.append("task_id = ?")
        params.append(task)
    if status:
        where.append("status = ?")
        params.append(status)
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id DESC LIMIT ?"
    return conn.execute(sql, [*params, limit]).fetchall()


# -- liveness ---------------------------------------------------------------

def runner_alive(stash, task_id, token) -> bool:
    """Whether the runner that owns TOKEN still holds its live lock.

    flock works across containers sharing the volume; a pid would not. Only
    checkers ever try this lock, so checking never blocks a real run.
    """
    if not token:
        return False
    path = stash.locks_dir / f"{task_id}.{token}.live"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def mark_abandoned(conn, stash) -> int:
    """Mark `running` rows whose runner is gone as `abandoned`; return how many."""
    rows = conn.execute(
        "SELECT id, task_id, runner FROM runs WHERE status = 'running'").fetchall()
    dead = [r for r in rows if not runner_alive(stash, r["task_id"], r["runner"])]
    if not dead:
        return 0
    now = clock.iso()
    with conn:
        for r in dead:
            # Guarded by status so a run that finished meanwhile keeps its outcome.
            conn.execute(
                "UPDATE runs SET status = 'abandoned', ended_at = ?, "
                "error = 'the runner vanished (killed, or the container stopped) before "
                "recording an outcome' WHERE id = ? AND status = 'running'", (now, r["id"]))
            _remove_live(stash, r["task_id"], r["runner"])
    return len(dead)


def _remove_live(stash, task_id, token):
    if token:
        try:
            (stash.locks_dir / f"{task_id}.{token}.live").unlink()
        except OSError:
            pass


# -- meta -------------------------------------------------------------------

def set_meta(conn, key, value):
    with conn:
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def get_meta(conn, key, default=None):
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


# -- retention ----------------------------------------------------------------

def prune(conn, stash, cutoff_iso: str, dry_run: bool = False) -> tuple[int, int]:
    """Delete runs that started before CUTOFF_ISO and their log files, together.

    A running run is never touched. Rows go first (one transaction), then
    their files: a crash between the two leaves stray files, never rows that
    point at deleted logs. Log files with no row (from a lost database) that
    are older than the cutoff go too. Returns (rows, files) deleted.
    """
    mark_abandoned(conn, stash)
    rows = conn.execute("SELECT id, log_path FROM runs WHERE started_at < ? AND status != 'running'",
                        (cutoff_iso,)).fetchall()
    paths = [stash.absolute(r["log_path"]) for r in rows if r["log_path"]]
    paths += _stray_logs(conn, stash, cutoff_iso)
    if dry_run:
        return len(rows), sum(1 for p in paths if p.exists())
    with conn:
        conn.executemany("DELETE FROM runs WHERE id = ?", [(r["id"],) for r in rows])
        conn.execute("DELETE FROM reports WHERE attempted_at < ?", (cutoff_iso,))
        _prune_hours(conn, cutoff_iso)
    files = 0
    for p in paths:
        try:
            p.unlink()
            files += 1
        except FileNotFoundError:
            pass
    return len(rows), files


def _prune_hours(conn, cutoff_iso):
    # Hours before the cutoff's lost all their finished runs; the cutoff's own
    # hour lost some of them: recompute it from the rows left.
    hour = cutoff_iso[:13]
    conn.execute("DELETE FROM run_hours WHERE hour <= ?", (hour,))
    # Every started_at of that hour starts with it, and sorts before hour + '~'.
    conn.execute(f"INSERT INTO run_hours ({_HOUR_COLUMNS}) "
                 + rollup_select("started_at >= ? AND started_at < ?"), (hour, hour + "~"))


def _stray_logs(conn, stash, cutoff_iso):
    from . import clock as _clock
    cutoff = _clock.compact(_clock.parse_iso(cutoff_iso).timestamp())
    known = {r[0] for r in conn.execute("SELECT log_path FROM runs WHERE log_path IS NOT NULL")}
    out = []
    if not stash.logs_dir.is_dir():
        return out
    for task_dir in stash.logs_dir.iterdir():
        for f in task_dir.glob("*.log") if task_dir.is_dir() else ():
            # Names start with the run's UTC start time, comparable as text.
            if f.name[:16] < cutoff and stash.relative(f) not in known:
                out.append(f)
    return out


# -- CLI ----------------------------------------------------------------------

RUN_COLUMNS = [("id", "id"), ("task_id", "task"), ("trigger", "trigger"), ("status", "status"),
               ("started_at", "started"), ("duration_s", "secs"), ("exit_code", "exit"),
               ("tokens", "tokens"), ("error", "note")]


def run_view(row) -> dict:
    """A run as `akm runs` shows it (JSON: every column but the output tails)."""
    d = {k: row[k] for k in row.keys() if k not in ("stdout", "stderr", "runner")}
    d["tools"] = json.loads(d["tools"]) if d.get("tools") else None
    d["duration_s"] = _duration(row["started_at"], row["ended_at"])
    p, c = row["prompt_tokens"], row["completion_tokens"]
    d["tokens"] = (p or 0) + (c or 0) if (p is not None or c is not None) else None
    return d


def _duration(start, end):
    if not end:
        return None
    from . import clock as _clock
    return round((_clock.parse_iso(end) - _clock.parse_iso(start)).total_seconds(), 3)


def cmd_runs(args) -> int:
    from .errors import UsageError
    from .output import emit
    from .stash import Stash
    if args.status and args.status not in STATUSES:
        raise UsageError(f"--status {args.status!r}: use one of {', '.join(STATUSES)}")
    if args.limit < 1:
        raise UsageError("--limit must be 1 or more")
    stash = Stash.resolve(args.stash)
    conn = connect(stash) if stash.state_db.exists() else None
    rows = []
    if conn is not None:
        mark_abandoned(conn, stash)
        rows = [run_view(r) for r in list_runs(conn, args.task, args.status, args.limit)]
    if args.format == "text" and not rows:
        print("no runs recorded yet" if conn is None else "no runs match")
        return 0
    emit(rows, RUN_COLUMNS, args.format)
    return 0


def cmd_prune(args) -> int:
    from .stash import Stash
    age = clock.duration_option("--older-than", args.older_than)
    stash = Stash.resolve(args.stash)
    if not stash.state_db.exists():
        print("nothing to prune: no state.db yet")
        return 0
    cutoff = clock.iso(time.time() - age.total_seconds())
    rows, files = prune(connect(stash), stash, cutoff, args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {rows} runs and {files} log files older than {args.older_than} "
          f"(started before {cutoff})")
    return 0
