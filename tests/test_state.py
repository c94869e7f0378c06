"""state.db: schema, migrations that keep rows, concurrent readers, prune, the runs/logs/prune CLI."""

import json
import os
import sqlite3
import subprocess
import time

import pytest

from conftest import AKM, write_task
from worker import state
from worker.errors import StateError
from worker.stash import Stash


def test_schema_has_the_contract_columns(stash):
    conn = state.connect(Stash(stash))
    cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    assert {"id", "task_id", "trigger", "status", "started_at", "ended_at", "exit_code", "stdout",
            "stderr", "prompt_tokens", "completion_tokens", "cost_usd", "tools", "error",
            "log_path"} <= cols
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == state.SCHEMA_VERSION


def test_migration_keeps_old_rows(stash, monkeypatch):
    s = Stash(stash)
    conn = state.connect(s)
    rid = state.start_run(conn, "old", "manual", "success", "2026-01-01T00:00:00.000Z")
    conn.close()
    monkeypatch.setattr(state, "MIGRATIONS", state.MIGRATIONS + ["ALTER TABLE runs ADD COLUMN extra TEXT"])
    monkeypatch.setattr(state, "SCHEMA_VERSION", len(state.MIGRATIONS))
    conn = state.connect(s)
    assert conn.execute("SELECT task_id FROM runs WHERE id = ?", (rid,)).fetchone()[0] == "old"
    assert "extra" in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}


def test_newer_schema_is_refused_with_a_clear_error(stash):
    conn = sqlite3.connect(stash / "state.db")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StateError, match="upgrade"):
        state.connect(Stash(stash))


def test_corrupt_state_db_is_a_clear_error(stash, akm):
    (stash / "state.db").write_bytes(b"this is not sqlite" * 100)
    write_task(stash, "t", 'schedule: "@daily"\ncommand: "true"\n')
    r = akm("tasks", "run", "t")
    assert r.returncode == 74 and "corrupted" in r.stderr and "Traceback" not in r.stderr
    r = akm("runs")
    assert r.returncode == 74


def test_reader_is_not_blocked_by_a_running_writer(stash, akm):
    write_task(stash, "w", 'schedule: "@daily"\ncommand: "echo go; sleep 3"\n')
    env = {**os.environ, "AKM_STASH": str(stash)}
    p = subprocess.Popen([AKM, "tasks", "run", "w"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()
        ro = sqlite3.connect(f"file:{stash / 'state.db'}?mode=ro", uri=True, timeout=0.1)
        assert ro.execute("SELECT status FROM runs").fetchone()[0] == "running"
    finally:
        p.terminate()
        p.wait()


def test_runs_cli_filters_and_formats(stash, akm):
    write_task(stash, "a", 'schedule: "@daily"\ncommand: "true"\n')
    write_task(stash, "b", 'schedule: "@daily"\ncommand: "false"\n')
    for t in ("a", "b", "a"):
        akm("tasks", "run", t)
    runs = json.loads(akm("runs", "--format", "json").stdout)
    assert [r["id"] for r in runs] == [3, 2, 1]
    assert [r["task_id"] for r in json.loads(akm("runs", "--task", "a", "--format", "json").stdout)] == ["a", "a"]
    assert len(json.loads(akm("runs", "--limit", "1", "--format", "json").stdout)) == 1
    failed = json.loads(akm("runs", "--status", "failed", "--format", "json").stdout)
    assert [r["task_id"] for r in failed] == ["b"]
    text = akm("runs").stdout
    assert text.splitlines()[0].split()[:4] == ["ID", "TASK", "TRIGGER", "STATUS"]
    r = akm("runs", "--status", "bogus")
    assert r.returncode == 64 and "use one of" in r.stderr


def test_runs_on_a_fresh_stash_creates_nothing(stash, akm):
    r = akm("runs")
    assert r.returncode == 0 and "no runs" in r.stdout
    assert not (stash / "state.db").exists()


def test_logs_cli_newest_by_run_raw_and_errors(stash, akm):
    write_task(stash, "l", 'schedule: "@daily"\ncommand: "echo run-$AKM_RUN_ID"\n')
    akm("tasks", "run", "l")
    akm("tasks", "run", "l")
    assert "run-2" in akm("logs", "l").stdout
    assert "run-1" in akm("logs", "l", "--run", "1").stdout
    raw = akm("logs", "l", "--raw").stdout.splitlines()
    assert json.loads(raw[0])["type"] == "start" and json.loads(raw[-1])["type"] == "end"
    r = akm("logs", "l", "--run", "99")
    assert r.returncode == 64 and "no log for run 99" in r.stderr
    r = akm("logs", "nothing")
    assert r.returncode == 64 and "no run logs" in r.stderr


def test_logs_follow_prints_until_the_run_ends(stash, akm):
    write_task(stash, "f", 'schedule: "@daily"\ncommand: "echo one; sleep 1.5; echo two"\n')
    env = {**os.environ, "AKM_STASH": str(stash)}
    p = subprocess.Popen([AKM, "tasks", "run", "f"], env=env, stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    r = akm("logs", "f", "--follow", timeout=15)
    p.wait()
    assert "one" in r.stdout and "two" in r.stdout and "=== success" in r.stdout


def test_prune_deletes_old_rows_and_files_together_but_never_running(stash, akm):
    s = Stash(stash)
    write_task(stash, "p", 'schedule: "@daily"\ncommand: "true"\n')
    akm("tasks", "run", "p")
    conn = state.connect(s)
    old = conn.execute("SELECT id, log_path FROM runs").fetchone()
    conn.execute("UPDATE runs SET started_at = '2020-01-01T00:00:00.000Z' WHERE id = ?", (old[0],))
    conn.execute("INSERT INTO runs (task_id, trigger, status, started_at, runner) "
                 "VALUES ('p', 'manual', 'running', '2020-01-01T00:00:00.000Z', NULL)")
    conn.commit()
    stray = stash / "logs/tasks/p/20200101T000000Z-77.log"
    stray.write_text("{}\n")
    akm("tasks", "run", "p")  # a recent run stays
    r = akm("prune", "--older-than", "30d", "--dry-run")
    assert r.returncode == 0 and "would delete" in r.stdout
    assert (stash / old[1]).exists()
    r = akm("prune", "--older-than", "30d")
    assert r.returncode == 0
    assert not (stash / old[1]).exists() and not stray.exists()
    left = [tuple(x) for x in conn.execute("SELECT id, status FROM runs ORDER BY id")]
    # The old `running` row had no live runner: marked abandoned, then pruned as old.
    assert len(left) == 1 and left[0][1] == "success"
    assert akm("prune", "--older-than", "soon").returncode == 64
