#!/usr/bin/env python3
"""Figures for the image: what it adds over its base, container start to the
first scheduled run, the start delay of an every-second task, and (--ci) the
wall time of the whole CI run.

    .venv/bin/python bench/image_figures.py              # image must be built
    .venv/bin/python bench/image_figures.py --build --ci --json out.json

Needs a Docker engine (.ci/prepare starts one). Prints one line per figure;
`figures()` returns them as a dict for the bench to include.
"""

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = "akm-worker:latest"
BASE = "debian:trixie-slim"
PUID = os.getuid() or 1000


def _docker(*args, check=True, **kw) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, **kw)
    if check and done.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def image_size() -> dict:
    size = int(_docker("image", "inspect", "-f", "{{.Size}}", IMAGE))
    base = int(_docker("image", "inspect", "-f", "{{.Size}}", BASE))
    return {"image_mb": round(size / 1e6, 1), "base_mb": round(base / 1e6, 1),
            "added_mb": round((size - base) / 1e6, 1)}


def _stash(root: Path, schedule: str) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "tick.yml").write_text(f'schedule: "{schedule}"\ncommand: "true"\n')
    if os.getuid() == 0:
        for p in (root, tasks, tasks / "tick.yml"):
            os.chown(p, PUID, PUID)
    return root


def _first_run(db: Path, timeout: float) -> float | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if db.exists():
            try:
                conn = sqlite3.connect(db, timeout=5)
                row = conn.execute("SELECT started_at FROM runs ORDER BY id LIMIT 1").fetchone()
                conn.close()
                if row:
                    return datetime.fromisoformat(row[0].replace("Z", "+00:00")).timestamp()
            except sqlite3.OperationalError:
                pass
        time.sleep(0.02)
    return None


def start_to_first_run(repeats: int = 5) -> dict:
    """`docker run` (wall clock before the call) to the started_at of the
    first run of an every-second task; a run can only start on a whole second,
    so this includes up to 1 s of waiting for the next one."""
    totals, readies = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="akm-fig-") as tmp:
            stash = _stash(Path(tmp) / "stash", "* * * * * * *")
            name = f"akm-fig-{os.getpid()}"
            t0 = time.time()
            _docker("run", "-d", "--name", name, "-e", f"PUID={PUID}", "-e", f"PGID={PUID}",
                    "-v", f"{stash}:/stash", IMAGE)
            try:
                first = _first_run(stash / "state.db", 30)
                logs = _docker("logs", "-t", name, check=False)
            finally:
                _docker("rm", "-f", name, check=False)
            if first is None:
                raise SystemExit("no run within 30 s:\n" + logs)
            totals.append(first - t0)
            for line in logs.splitlines():
                if "supercronic started" in line:
                    stamp = line.split()[0]
                    ready = datetime.fromisoformat(stamp[:26] + "+00:00").timestamp()
                    readies.append(ready - t0)
                    break
    return {"start_to_first_run_s": round(statistics.median(totals), 2),
            "start_to_scheduler_ready_s": round(statistics.median(readies), 2) if readies else None,
            "repeats": repeats}


def start_delay(seconds: int = 30) -> dict:
    """How late an every-second task starts against its scheduled second."""
    with tempfile.TemporaryDirectory(prefix="akm-fig-") as tmp:
        stash = _stash(Path(tmp) / "stash", "* * * * * * *")
        name = f"akm-fig-delay-{os.getpid()}"
        _docker("run", "-d", "--name", name, "-e", f"PUID={PUID}", "-e", f"PGID={PUID}",
                "-v", f"{stash}:/stash", IMAGE)
        try:
            time.sleep(seconds + 2)
        finally:
            _docker("rm", "-f", name, check=False)
        conn = sqlite3.connect(stash / "state.db")
        rows = [r[0] for r in conn.execute("SELECT started_at FROM runs ORDER BY id")]
        conn.close()
    delays = sorted(int(s[20:23]) for s in rows)   # the milliseconds past the second
    if not delays:
        return {"start_delay_runs": 0}
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return {"start_delay_p50_ms": statistics.median(delays), "start_delay_p99_ms": p99,
            "start_delay_runs": len(delays)}


def ci_wall_time() -> dict:
    """Time `.ci/run` in a fresh clone, as CI does."""
    with tempfile.TemporaryDirectory(prefix="akm-ci-") as tmp:
        subprocess.run(["git", "clone", "-q", str(REPO), tmp], check=True)
        t0 = time.monotonic()
        done = subprocess.run([f"{tmp}/.ci/run"], cwd=tmp, env=dict(os.environ, CI="true"),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        took = time.monotonic() - t0
    tail = done.stdout.strip().splitlines()[-3:]
    return {"ci_wall_s": round(took, 1), "ci_exit": done.returncode, "ci_tail": tail}


def figures(build=False, ci=False, repeats=5, delay_seconds=30) -> dict:
    out = {}
    if build:
        t0 = time.monotonic()
        _docker("build", "-q", "-t", IMAGE, str(REPO), timeout=900)
        out["build_s"] = round(time.monotonic() - t0, 1)
    out.update(image_size())
    out.update(start_to_first_run(repeats))
    if delay_seconds:
        out.update(start_delay(delay_seconds))
    if ci:
        out.update(ci_wall_time())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="build the image first (timed)")
    p.add_argument("--ci", action="store_true", help="also time .ci/run in a fresh clone")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--delay-seconds", type=int, default=30,
                   help="how long to sample the every-second task's start delay (0: skip)")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)
    res = figures(args.build, args.ci, args.repeats, args.delay_seconds)
    for key, value in res.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
