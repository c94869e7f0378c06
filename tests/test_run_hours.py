"""state.run_hours, the hourly rollup `akm health` reads: it must give exactly
the figures of one GROUP BY over the window's raw rows."""

import random
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from worker import clock, state
from worker.health import RUN_KINDS, _Db
from worker.stash import Stash

NOW = datetime(2026, 11, 25, 6, 20, 17, 250000, tzinfo=timezone.utc)
BUDGETS = {"t0": 5000, "t1": 100, "t3": 8000}   # t2 has none; t4 only ever has old runs
TOKENS = "coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)"


def reference(conn, since, now, budgets):
    """The figures straight from the raw rows (the query health used before run_hours)."""
    out = {}
    for r in conn.execute("SELECT * FROM runs WHERE started_at >= ? AND started_at <= ?",
                          (clock.iso_dt(since), clock.iso_dt(now))):
        f = out.setdefault(r["task_id"], {"runs": 0, "successes": 0, "tokens": 0, "cost": 0.0,
                                          **{f"n_{k}": 0 for k in RUN_KINDS}, "n_over_budget": 0,
                                          **{f"id_{k}": None for k in RUN_KINDS},
                                          "id_over_budget": None})
        used = (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
        f["runs"] += 1
        f["successes"] += r["status"] == "success"
        f["tokens"] += used
        f["cost"] += r["cost_usd"] or 0.0
        kinds = [r["status"]] if r["status"] in RUN_KINDS else []
        if r["task_id"] in budgets and used > budgets[r["task_id"]]:
            kinds.append("over_budget")
        for k in kinds:
            f[f"n_{k}"] += 1
            f[f"id_{k}"] = max(f[f"id_{k}"] or 0, r["id"])
    return out


def figures(conn, since, now, budgets):
    rows = _Db(conn, now, now - since).window(budgets)
    return {r["task_id"]: {k: r[k] for k in r if k != "task_id"} for r in rows}


def assert_same(conn, since, now, budgets=BUDGETS):
    got, want = figures(conn, since, now, budgets), reference(conn, since, now, budgets)
    assert sorted(got) == sorted(want)
    for task in want:
        g, w = dict(got[task]), dict(want[task])
        # Float sums in another order: equal to the last bits, and health rounds to 6 places.
        assert g.pop("cost") == pytest.approx(w.pop("cost"), rel=1e-12, abs=1e-12)
        assert int(g.pop("tokens")) == w.pop("tokens")
        assert g == w, (task, since, now)


def random_history(conn, s, rng, n=3000):
    """N runs over the 40 hours before NOW, through every writer: start_run +
    finish_run, start_run of a final status, abandoned `running` rows, a few
    still running, and plain INSERTs (what a person with `sqlite3` does)."""
    statuses = ["success"] * 20 + ["failed", "timeout", "error", "skipped", "interrupted"] * 2
    for _ in range(n):
        task = f"t{rng.randrange(5)}"
        started = NOW - timedelta(seconds=rng.uniform(-60, 40 * 3600))
        if task == "t4":
            started -= timedelta(days=3)
        iso = clock.iso_dt(started)
        p, c = rng.choice([(None, None), (rng.randrange(6000), rng.randrange(3000)),
                           (rng.randrange(60), None)])
        cost = rng.choice([None, rng.uniform(0, 0.05)])
        way = rng.random()
        status = rng.choice(statuses)
        if way < 0.6:
            rid = state.start_run(conn, task, "schedule", "running", iso, runner="live")
            if rng.random() < 0.97:
                state.finish_run(conn, rid, status=status, ended_at=iso, prompt_tokens=p,
                                 completion_tokens=c, cost_usd=cost)
        elif way < 0.7:
            state.start_run(conn, task, "schedule", rng.choice(["error", "skipped"]), iso,
                            ended_at=iso, error="x")
        elif way < 0.8:
            state.start_run(conn, task, "schedule", "running", iso, runner=None,
                            prompt_tokens=p, completion_tokens=c, cost_usd=cost)
        else:
            with conn:
                conn.execute("INSERT INTO runs (task_id, trigger, status, started_at, "
                             "prompt_tokens, completion_tokens, cost_usd) "
                             "VALUES (?, 'manual', ?, ?, ?, ?, ?)", (task, status, iso, p, c, cost))
    # runner=None has no live lock: abandoned; 'live' ones stay running.
    return state.mark_abandoned(conn, s)


def rollup_from_scratch(conn):
    rows = conn.execute(state.rollup_select("1") + " ORDER BY 1, 2").fetchall()
    return [tuple(r) for r in rows]


def rollup(conn):
    cols = state._HOUR_COLUMNS
    return [tuple(r) for r in conn.execute(f"SELECT {cols} FROM run_hours ORDER BY 1, 2")]


def same_rollup(conn):
    got, want = rollup(conn), rollup_from_scratch(conn)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        cost = state._HOUR_COLUMNS.split(", ").index("cost")
        assert g[cost] == pytest.approx(w[cost], rel=1e-12, abs=1e-12)
        assert g[:cost] + g[cost + 1:] == w[:cost] + w[cost + 1:]


WINDOWS = [timedelta(hours=24), timedelta(hours=6, minutes=17, seconds=3),
           timedelta(minutes=40), timedelta(minutes=5), timedelta(hours=1),
           timedelta(hours=2), timedelta(days=5), timedelta(seconds=1)]
NOWS = [NOW, NOW.replace(minute=0, second=0, microsecond=0),
        NOW.replace(minute=59, second=59, microsecond=999000) - timedelta(hours=3),
        NOW - timedelta(hours=11, minutes=1)]


def test_window_figures_equal_the_raw_rows(stash, monkeypatch):
    s = Stash(stash)
    conn = state.connect(s)
    # 'live' runners hold their lock for the test: those rows stay `running`.
    monkeypatch.setattr(state, "runner_alive", lambda stash, task, token: token == "live")
    rng = random.Random(7)
    assert random_history(conn, s, rng) > 0
    same_rollup(conn)
    for now in NOWS:
        for window in WINDOWS:
            assert_same(conn, now - window, now)
    # Budgets change: judged against today's, never the one in force at the time.
    assert_same(conn, NOW - timedelta(hours=24), NOW, {"t0": 0, "t2": 3000, "t4": 1})
    assert_same(conn, NOW - timedelta(hours=24), NOW, {})
    # Prune mid-hour: the cutoff's own hour is recomputed from the rows left.
    cutoff = NOW - timedelta(hours=20, minutes=33, seconds=7)
    deleted, _ = state.prune(conn, s, clock.iso_dt(cutoff))
    assert deleted > 0
    same_rollup(conn)
    for now in NOWS:
        for window in WINDOWS:
            assert_same(conn, now - window, now)


def test_prune_keeps_the_rollup_consistent(stash):
    s = Stash(stash)
    conn = state.connect(s)
    base = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)
    for minute in range(0, 180, 7):
        rid = state.start_run(conn, "p", "schedule", "running",
                              clock.iso_dt(base + timedelta(minutes=minute)), runner="x")
        state.finish_run(conn, rid, status="failed" if minute % 3 else "success",
                         prompt_tokens=minute, completion_tokens=1, cost_usd=0.5)
    state.prune(conn, s, "2026-11-20T11:30:00.000Z")
    same_rollup(conn)
    hours = {r["hour"]: r for r in conn.execute("SELECT * FROM run_hours")}
    assert sorted(hours) == ["2026-11-20T11", "2026-11-20T12"]
    left = conn.execute("SELECT count(*), max(id) FROM runs WHERE status = 'success' "
                        "AND started_at LIKE '2026-11-20T11%'").fetchone()
    assert (hours["2026-11-20T11"]["n_success"], hours["2026-11-20T11"]["id_success"]) \
        == tuple(left)


def test_v1_database_migrates_with_its_rollup(stash):
    path = stash / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(state.MIGRATIONS[0])
    rows = [("a", "success", "2026-11-20T10:05:00.000Z", 10, 5, 0.25),
            ("a", "failed", "2026-11-20T10:55:00.000Z", 700, None, None),
            ("a", "running", "2026-11-20T10:56:00.000Z", None, None, None),
            ("a", "abandoned", "2026-11-20T11:00:00.000Z", None, None, None),
            ("b", "skipped", "2026-11-20T10:30:00.000Z", None, None, None),
            ("b", "timeout", "2026-11-20T10:31:00.000Z", 3, 4, 1.0)]
    conn.executemany("INSERT INTO runs (task_id, trigger, status, started_at, prompt_tokens, "
                     "completion_tokens, cost_usd) VALUES (?, 'schedule', ?, ?, ?, ?, ?)", rows)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    conn = state.connect(Stash(stash))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == state.SCHEMA_VERSION == 2
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 6
    got = {(r["task_id"], r["hour"]): dict(r) for r in conn.execute("SELECT * FROM run_hours")}
    assert sorted(got) == [("a", "2026-11-20T10"), ("a", "2026-11-20T11"), ("b", "2026-11-20T10")]
    a10 = got[("a", "2026-11-20T10")]
    assert (a10["n_success"], a10["id_success"], a10["n_failed"], a10["id_failed"],
            a10["tokens"], a10["cost"], a10["max_tokens"]) == (1, 1, 1, 2, 715, 0.25, 700)
    assert (got[("a", "2026-11-20T11")]["n_abandoned"], got[("a", "2026-11-20T11")]["id_abandoned"]) \
        == (1, 4)
    b10 = got[("b", "2026-11-20T10")]
    assert (b10["n_skipped"], b10["n_timeout"], b10["id_timeout"], b10["tokens"]) == (1, 1, 6, 7)
    # The running row joins its hour when it finishes.
    state.finish_run(conn, 3, status="success")
    assert conn.execute("SELECT n_success FROM run_hours WHERE task_id = 'a' "
                        "AND hour = '2026-11-20T10'").fetchone()[0] == 2
    same_rollup(conn)
