"""`akm tasks run`: the record, the log, the exit codes, timeouts, signals, secrets."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


from conftest import AKM, run_akm, write_task


def rows(stash, sql="SELECT * FROM runs ORDER BY id"):
    conn = sqlite3.connect(stash / "state.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # a detached first run is creating it
            return []
        raise
    finally:
        conn.close()


def log_records(stash, row):
    path = stash / row["log_path"]
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_success_records_row_log_and_passes_output_through(stash, akm):
    write_task(stash, "hello", """
        schedule: "@hourly"
        command: "echo out-line; echo err-line >&2"
        description: says hello
    """)
    r = akm("tasks", "run", "hello")
    assert r.returncode == 0
    assert "out-line" in r.stdout and "err-line" in r.stderr
    [row] = rows(stash)
    assert row["status"] == "success" and row["exit_code"] == 0 and row["trigger"] == "manual"
    assert row["stdout"] == "out-line\n" and row["stderr"] == "err-line\n"
    assert row["started_at"].endswith("Z") and row["ended_at"] >= row["started_at"]
    recs = log_records(stash, row)
    assert recs[0]["type"] == "start" and recs[0]["description"] == "says hello"
    assert recs[-1]["type"] == "end" and recs[-1]["status"] == "success"
    outputs = [(r["stream"], r["line"]) for r in recs if r["type"] == "output"]
    assert sorted(outputs) == [("stderr", "err-line"), ("stdout", "out-line")]
    assert ":" not in row["log_path"]


def test_exit_code_passes_through_and_run_is_failed(stash, akm):
    write_task(stash, "bad", 'schedule: "@daily"\ncommand: "exit 7"\n')
    r = akm("tasks", "run", "bad")
    assert r.returncode == 7
    assert rows(stash)[0]["status"] == "failed"


def test_trigger_schedule_is_recorded(stash, akm):
    write_task(stash, "t", 'schedule: "@daily"\ncommand: "true"\n')
    assert akm("tasks", "run", "t", "--trigger", "schedule").returncode == 0
    assert rows(stash)[0]["trigger"] == "schedule"


def test_unknown_task_is_a_usage_error_without_a_row(stash, akm):
    r = akm("tasks", "run", "nope")
    assert r.returncode == 64
    assert "unknown task 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert not (stash / "state.db").exists() or rows(stash) == []


def test_invalid_task_file_is_recorded_as_error(stash, akm):
    write_task(stash, "broken", 'schedule: "@daily"\ncommand: ""\n')
    r = akm("tasks", "run", "broken")
    assert r.returncode == 65 and "Traceback" not in r.stderr
    [row] = rows(stash)
    assert row["status"] == "error" and "broken.yml" in row["error"]


def test_missing_variable_fails_before_the_command_starts(stash, akm, tmp_path):
    marker = tmp_path / "ran"
    write_task(stash, "needs", f"""
        schedule: "@daily"
        command: "touch {marker}"
        env:
          API_KEY: "${{MISSING_VAR_FOR_TEST}}"
    """)
    r = akm("tasks", "run", "needs")
    assert r.returncode == 65
    assert "MISSING_VAR_FOR_TEST" in r.stderr and "needs" in r.stderr and ".env" in r.stderr
    assert not marker.exists()
    [row] = rows(stash)
    assert row["status"] == "error" and "MISSING_VAR_FOR_TEST" in row["error"]


def test_env_interpolation_defaults_and_literal_dollar(stash, akm):
    write_task(stash, "envy", """
        schedule: "@daily"
        command: 'echo "$A|$B|$C|$AKM_TASK_ID|$AKM_RUN_ID"'
        env:
          A: "${FROM_OUTSIDE}"
          B: "${UNSET_THING:-fallback}"
          C: "cost $$5"
    """)
    r = akm("tasks", "run", "envy", env={"FROM_OUTSIDE": "outside"})
    assert r.returncode == 0
    # A's value was interpolated, so it is masked like any secret would be.
    assert r.stdout.strip() == "***|fallback|cost $5|envy|1"
    start = log_records(stash, rows(stash)[0])[0]
    assert start["env"] == ["A", "B", "C"]


def test_command_runs_in_the_stash_directory(stash, akm):
    write_task(stash, "pwd", 'schedule: "@daily"\ncommand: "pwd"\n')
    r = akm("tasks", "run", "pwd")
    assert r.stdout.strip() == str(stash.resolve())


def test_list_command_runs_without_a_shell(stash, akm):
    write_task(stash, "argv", 'schedule: "@daily"\ncommand: ["printf", "%s;", "a b", "$HOME"]\n')
    r = akm("tasks", "run", "argv")
    assert r.returncode == 0 and r.stdout.startswith("a b;$HOME;")


def test_list_command_not_found_is_an_error_not_a_traceback(stash, akm):
    write_task(stash, "nocmd", 'schedule: "@daily"\ncommand: ["no-such-binary-xyz"]\n')
    r = akm("tasks", "run", "nocmd")
    assert r.returncode == 127 and "Traceback" not in r.stderr
    [row] = rows(stash)
    assert row["status"] == "error" and "cannot start" in row["error"]


def test_timeout_kills_grandchildren_and_exits_124(stash, akm, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    write_task(stash, "slow", f"""
        schedule: "@daily"
        command: "sh -c 'echo $$ > {pidfile}; exec sleep 300' & wait"
        timeout: 1
    """)
    t = time.monotonic()
    r = akm("tasks", "run", "slow", env={"AKM_KILL_GRACE": "2"})
    assert r.returncode == 124
    assert time.monotonic() - t < 10
    [row] = rows(stash)
    assert row["status"] == "timeout" and row["ended_at"]
    grandchild = int(pidfile.read_text())
    assert wait_for(lambda: not pid_alive(grandchild), 2)


def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored(stash, akm):
    write_task(stash, "stubborn", """
        schedule: "@daily"
        command: "trap '' TERM; sleep 30 & wait; sleep 30"
        timeout: 1
    """)
    t = time.monotonic()
    r = akm("tasks", "run", "stubborn", env={"AKM_KILL_GRACE": "1"})
    assert r.returncode == 124 and time.monotonic() - t < 8
    recs = log_records(stash, rows(stash)[0])
    assert any("SIGKILL" in x.get("message", "") for x in recs if x["type"] == "warning")


def test_sigterm_to_runner_is_forwarded_and_recorded_interrupted(stash, tmp_path):
    write_task(stash, "long", 'schedule: "@daily"\ncommand: "echo started; sleep 60"\n')
    env = {**os.environ, "AKM_STASH": str(stash), "AKM_KILL_GRACE": "2"}
    p = subprocess.Popen([AKM, "tasks", "run", "long"], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 130
    [row] = rows(stash)
    assert row["status"] == "interrupted" and row["ended_at"]


def test_runner_killed_with_sigkill_leaves_a_row_that_becomes_abandoned(stash, akm):
    write_task(stash, "victim", 'schedule: "@daily"\ncommand: "echo go; sleep 30"\n')
    env = {**os.environ, "AKM_STASH": str(stash)}
    p = subprocess.Popen([AKM, "tasks", "run", "victim"], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go"
    assert rows(stash)[0]["status"] == "running"
    p.kill()
    p.wait()
    # The orphaned command still runs and still holds the task's locks: the
    # row stays `running` and the task is not started again on top of it.
    pgid = log_records(stash, rows(stash)[0])[0]["pid"]
    assert json.loads(akm("runs", "--format", "json").stdout)[0]["status"] == "running"
    assert akm("tasks", "run", "victim").returncode == 75
    os.killpg(pgid, signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(pgid), 5)
    # Once it is gone, the next look marks the row abandoned...
    r = akm("runs", "--format", "json")
    run = json.loads(r.stdout)[-1]
    assert run["status"] == "abandoned" and "vanished" in run["error"]
    # ...and the task can run again at once: the lock died with the runner.
    write_task(stash, "victim", 'schedule: "@daily"\ncommand: "true"\n')
    assert akm("tasks", "run", "victim").returncode == 0


def test_a_live_run_is_not_marked_abandoned(stash, akm):
    write_task(stash, "busy", 'schedule: "@daily"\ncommand: "echo go; sleep 5"\n')
    env = {**os.environ, "AKM_STASH": str(stash)}
    p = subprocess.Popen([AKM, "tasks", "run", "busy"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "go"
        [run] = json.loads(akm("runs", "--format", "json").stdout)
        assert run["status"] == "running"
    finally:
        p.terminate()
        p.wait()


def test_overlapping_run_is_skipped_with_its_own_code(stash, akm):
    write_task(stash, "once", 'schedule: "@daily"\ncommand: "echo go; sleep 5"\n')
    env = {**os.environ, "AKM_STASH": str(stash)}
    p = subprocess.Popen([AKM, "tasks", "run", "once"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "go"
        r = akm("tasks", "run", "once", "--trigger", "schedule")
        assert r.returncode == 75 and "already running" in r.stderr
    finally:
        p.terminate()
        p.wait()
    statuses = sorted(r["status"] for r in rows(stash))
    assert statuses == ["interrupted", "skipped"]


def test_secret_printed_by_the_command_is_masked_everywhere(stash, akm):
    secret = "s3cr3t-Value-98765"
    other = "ghp_abcdefgh12345678"
    write_task(stash, "leaky", """
        schedule: "@daily"
        command: |
          echo "key=$API_KEY"
          echo "tok=$GITHUB_TOKEN" >&2
          printf '%s' "$API_KEY" | cut -c1-6; printf '%s\\n' "$API_KEY" | cut -c7-
          printf 'split:%s' "$(echo "$API_KEY" | head -c 5)"; sleep 0.2; printf '%s\\n' "$(echo "$API_KEY" | tail -c +6)"
          exit 3
        env:
          API_KEY: "${MY_SECRET}"
    """)
    r = akm("tasks", "run", "leaky", env={"MY_SECRET": secret, "GITHUB_TOKEN": other})
    assert r.returncode == 3
    assert "key=***" in r.stdout and "tok=***" in r.stderr and "split:***" in r.stdout
    db = (stash / "state.db").read_bytes()
    wal = (stash / "state.db-wal").read_bytes() if (stash / "state.db-wal").exists() else b""
    logs = b"".join(p.read_bytes() for p in (stash / "logs").rglob("*.log"))
    for blob in (r.stdout.encode(), r.stderr.encode(), db, wal, logs):
        assert secret.encode() not in blob and other.encode() not in blob


def test_short_values_are_not_masked(stash, akm):
    write_task(stash, "short", 'schedule: "@daily"\ncommand: "echo v=$X_KEY"\nenv:\n  X_KEY: "${SHORT}"\n')
    r = akm("tasks", "run", "short", env={"SHORT": "abc"})
    assert r.stdout.strip() == "v=abc"


def test_usage_file_lines_are_summed_and_bad_lines_warned(stash, akm):
    write_task(stash, "agent", """
        schedule: "@daily"
        command: |
          echo '{"prompt_tokens": 100, "completion_tokens": 20, "cost_usd": 0.5, "model": "m1", "tools": {"grep": 2}}' >> "$AKM_USAGE_FILE"
          echo 'not json' >> "$AKM_USAGE_FILE"
          echo '{"prompt_tokens": 1, "completion_tokens": 2, "cost_usd": 0.25, "model": "m2", "tools": {"grep": 1, "edit": 4}}' >> "$AKM_USAGE_FILE"
          echo '{"prompt_tokens": "many"}' >> "$AKM_USAGE_FILE"
    """)
    assert akm("tasks", "run", "agent").returncode == 0
    [row] = rows(stash)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (101, 22, 0.75)
    assert row["model"] == "m2" and json.loads(row["tools"]) == {"grep": 3, "edit": 4}
    recs = log_records(stash, row)
    warnings = [x["message"] for x in recs if x["type"] == "warning"]
    assert len(warnings) == 2 and "line 2" in warnings[0] and "line 4" in warnings[1]
    assert recs[-1]["usage"]["total_tokens"] == 123 and recs[-1]["tools"]["edit"] == 4


def test_output_tail_is_bounded_and_marked(stash, akm):
    write_task(stash, "chatty", """
        schedule: "@daily"
        command: "head -c 3000000 /dev/zero | tr '\\\\0' 'x' | fold -w 100; echo LAST"
    """)
    assert akm("tasks", "run", "chatty").returncode == 0
    [row] = rows(stash)
    assert row["stdout"].startswith("[... ") and "bytes truncated" in row["stdout"].splitlines()[0]
    assert row["stdout"].endswith("LAST\n") and len(row["stdout"]) < 70_000
    assert (stash / "state.db").stat().st_size < 1_000_000


def test_binary_and_long_lines_are_recorded_as_valid_json(stash, akm):
    write_task(stash, "binary", """
        schedule: "@daily"
        command: "printf '\\\\377\\\\376bad\\\\n'; head -c 200000 /dev/zero | tr '\\\\0' y; echo; echo end"
    """)
    assert akm("tasks", "run", "binary").returncode == 0
    recs = log_records(stash, rows(stash)[0])
    out = [x for x in recs if x["type"] == "output"]
    assert out[0]["line"] == "\ufffd\ufffdbad"
    long_pieces = [x for x in out if x.get("partial")]
    assert long_pieces and sum(len(x["line"]) for x in out if set(x["line"]) == {"y"}) == 200000
    assert out[-1]["line"] == "end"


def test_hundred_concurrent_runs_are_all_recorded(stash):
    for i in range(100):
        write_task(stash, f"t{i:03d}", 'schedule: "* * * * *"\ncommand: "echo hi"\n')
    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(lambda i: run_akm(stash, "tasks", "run", f"t{i:03d}"), range(100)))
    assert [r.returncode for r in results] == [0] * 100, [r.stderr for r in results if r.returncode]
    assert not any("locked" in r.stderr for r in results)
    got = rows(stash)
    assert len(got) == 100 and {r["status"] for r in got} == {"success"}


def test_large_output_keeps_runner_memory_flat(stash, tmp_path):
    """Peak RSS of the runner (and its command) for 20 MB and 400 MB of output."""
    write_task(stash, "big", 'schedule: "@daily"\ncommand: "head -c $N /dev/zero | tr \'\\\\0\' x | fold -w 1000"\n')
    probe = ("import os, resource, subprocess, sys;"
             "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True);"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peaks = []
    for n in (20_000_000, 400_000_000):
        env = {**os.environ, "AKM_STASH": str(stash), "N": str(n)}
        out = subprocess.run([sys.executable, "-c", probe, AKM, "tasks", "run", "big"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        peaks.append(int(out.stdout))
    assert peaks[1] < peaks[0] + 10_000, peaks   # KiB: 20x the output, < 10 MB more
    assert (stash / "state.db").stat().st_size < 1_000_000


def test_detach_returns_at_once_and_records_the_run(stash, tmp_path):
    sink = tmp_path / "sink.log"
    sink.touch()
    write_task(stash, "bg", 'schedule: "@daily"\ncommand: "sleep 1; echo from-bg"\n')
    t = time.monotonic()
    r = run_akm(stash, "tasks", "run", "bg", "--trigger", "schedule", "--detach",
                env={"AKM_LOG_SINK": str(sink)})
    assert r.returncode == 0 and time.monotonic() - t < 0.9
    assert wait_for(lambda: rows(stash) and rows(stash)[0]["status"] == "success", 10)
    assert "[bg] from-bg" in sink.read_text()
    assert rows(stash)[0]["trigger"] == "schedule"


def test_core_is_callable_without_the_cli(stash):
    from worker.runner import run_task
    from worker.stash import Stash
    write_task(stash, "direct", 'schedule: "@daily"\ncommand: "exit 4"\n')
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        result = run_task(Stash(stash), "direct", environ={"PATH": os.environ["PATH"]},
                          out_fd=null, err_fd=null)
    finally:
        os.close(null)
    assert (result.status, result.exit_code) == ("failed", 4)


def test_error_and_skipped_runs_have_a_log_too(stash, akm):
    write_task(stash, "needy", 'schedule: "@daily"\ncommand: "true"\nenv:\n  X: "${NOPE_NOT_SET}"\n')
    assert akm("tasks", "run", "needy").returncode == 65
    r = akm("logs", "needy", "--run", "1")
    assert r.returncode == 0 and "=== error" in r.stdout and "NOPE_NOT_SET" in r.stdout


def test_description_is_masked_in_the_log(stash, akm):
    write_task(stash, "desc", 'schedule: "@daily"\ncommand: "true"\ndescription: "uses hunter2hunter2"\n')
    akm("tasks", "run", "desc", env={"DB_PASSWORD": "hunter2hunter2"})
    assert "hunter2hunter2" not in (stash / rows(stash)[0]["log_path"]).read_text()


def test_truncated_tail_starts_at_a_line(stash, akm):
    write_task(stash, "lines", 'schedule: "@daily"\ncommand: "seq 1 200000"\n')
    akm("tasks", "run", "lines")
    first, second = rows(stash)[0]["stdout"].split("\n")[:2]
    assert first.startswith("[... ") and int(second) == int(rows(stash)[0]["stdout"].split("\n")[2]) - 1


def test_a_daemon_left_behind_does_not_keep_the_task_locked(stash, akm, tmp_path):
    pidfile = tmp_path / "daemon.pid"
    write_task(stash, "forker", f"""
        schedule: "@daily"
        command: "setsid sh -c 'echo $$ > {pidfile}; exec sleep 30' > /dev/null 2>&1 < /dev/null &"
    """)
    try:
        assert akm("tasks", "run", "forker").returncode == 0
        assert wait_for(pidfile.exists, 5)
        assert pid_alive(int(pidfile.read_text()))
        assert akm("tasks", "run", "forker").returncode == 0   # not skipped
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
