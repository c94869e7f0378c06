"""How long `akm health` takes with 1,000,000 rows in runs.

    .venv/bin/python bench/health_bench.py [--rows 1000000] [--tasks 50] [--repeat 7]

Builds a temporary stash: TASKS task files on a */5 schedule and ROWS runs
spread back from now at each task's 5-minute cadence (so 1M rows with 50
tasks cover about 69 days; the default 24h window holds about 14,400 of
them), one failure in 40, a few over budget, one running row, a few
`reports` rows. Then times `akm health` as a subprocess (what a person or
the sidecar pays, interpreter start included) and prints the median and
the spread, for the default window and for a 30-day one.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from worker import clock, state  # noqa: E402
from worker.stash import Stash  # noqa: E402

AKM = str(Path(sys.executable).with_name("akm"))


def build(root: Path, rows: int, tasks: int):
    (root / "tasks").mkdir(parents=True)
    for i in range(tasks):
        (root / "tasks" / f"task-{i:03d}.yml").write_text(
            f"schedule: '*/5 * * * *'\ncommand: echo {i}\ntoken_budget: 5000\n")
    conn = state.connect(Stash(root))
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    now -= timedelta(minutes=now.minute % 5)
    rng = random.Random(4)

    def gen():
        per_task = rows // tasks
        # Oldest first, so ids grow with time as they do in a real state.db.
        for step in range(per_task, 0, -1):
            started = now - timedelta(minutes=5 * (step - 1)) + timedelta(seconds=0.3)
            s_iso = clock.iso_dt(started)
            e_iso = clock.iso_dt(started + timedelta(seconds=20))
            for t in range(tasks):
                status = "failed" if rng.random() < 0.025 else "success"
                tokens = rng.randint(500, 6000)
                yield (f"task-{t:03d}", "schedule", status, s_iso, e_iso,
                       0 if status == "success" else 1, tokens // 2, tokens - tokens // 2,
                       tokens * 2e-6, "boom" if status == "failed" else None,
                       f"logs/tasks/task-{t:03d}/x.log")

    started = time.monotonic()
    with conn:
        conn.executemany(
            "INSERT INTO runs (task_id, trigger, status, started_at, ended_at, exit_code, "
            "prompt_tokens, completion_tokens, cost_usd, error, log_path) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", gen())
        conn.execute("INSERT INTO runs (task_id, trigger, status, started_at, runner) "
                     "VALUES ('task-000', 'schedule', 'running', ?, 'gone')",
                     (clock.iso_dt(now),))
        for h in range(5):
            conn.execute("INSERT INTO reports (attempted_at, outcome, http_status) "
                         "VALUES (?, 'ok', 204)", (clock.iso_dt(now - timedelta(hours=h)),))
    count = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(f"built {count:,} runs in {time.monotonic() - started:.1f}s "
          f"({(root / 'state.db').stat().st_size / 1e6:.0f} MB)")


def time_health(root: Path, repeat: int, *args) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
    env["AKM_STASH"] = str(root)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        r = subprocess.run([AKM, "health", "--format", "json", *args], env=env,
                           capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode not in (0, 1):
            sys.exit(f"akm health failed ({r.returncode}): {r.stderr}")
    return times[1:]  # the first warms the page cache


def startup(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([AKM, "version"], capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "stash"
        build(root, args.rows, args.tasks)
        print(f"`akm version` (interpreter start): median {startup(args.repeat) * 1000:.0f} ms")
        for window in ("24h", "30d"):
            times = time_health(root, args.repeat, "--window", window)
            print(f"`akm health --window {window}`: median {statistics.median(times) * 1000:.0f} ms "
                  f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}, n={len(times)})")


if __name__ == "__main__":
    main()
