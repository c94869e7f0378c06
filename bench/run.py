"""The akm-worker benchmark: every figure of issue 5 in one command.

    .venv/bin/python bench/run.py            # everything (about 4 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # a smaller version for CI (about a minute)
    .venv/bin/python bench/run.py --only overhead,output --no-image

Prints a markdown table and writes bench/results/latest.md and latest.json
(--quick: quick.md and quick.json, not committed). Needs about 1.5 GB free
in $AKM_BENCH_CACHE and the temp dir for the 1 GiB output case; the image
figures need an engine and the akm-worker:latest image (else a note says
they were skipped).

Every time is a median over repeated runs; where a floor or a peer exists it
is measured in the same run, interleaved, and the table gives the difference
or ratio (these machines are noisy; absolute times alone mean little).

The runner is measured as users get it: a regular (non-editable) install of
this checkout into a fresh virtual environment the bench makes under
$AKM_BENCH_CACHE (default ~/.cache/akm-bench). An editable install pays an
import-finder cost on every start that no user pays; the machine's own
python3 pays ~20 ms of site start-up that a venv does not (ENVIRONMENT.md).

A target missed is reported as missed, never dropped.
"""

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = Path(os.environ.get("AKM_BENCH_CACHE") or Path.home() / ".cache" / "akm-bench")
IMAGE = os.environ.get("AKM_TEST_IMAGE", "akm-worker:latest")
SECRET = "bench-secret-3f8a9c1d"
MiB = 1 << 20
# The wrapper that measures peak RSS: it only spawns the runner, so
# RUSAGE_CHILDREN's max is the runner's (or its command's, if larger).
RSS_WRAPPER = ("import resource, subprocess, sys\n"
               "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


# -- results ------------------------------------------------------------------

class Results:
    """Rows of the table: a figure, its value, the floor/peer, target, verdict."""

    def __init__(self):
        self.rows, self.notes, self.raw = [], [], {}

    def add(self, section, figure, value, ref="", target="", met=None):
        self.rows.append({"section": section, "figure": figure, "value": value,
                          "reference": ref, "target": target,
                          "met": None if met is None else bool(met)})
        print(f"  {figure}: {value}" + (f"  [{ref}]" if ref else "")
              + (f"  target {target}: {'met' if met else 'MISSED'}" if met is not None else ""),
              flush=True)

    def note(self, text):
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def markdown(self, machine) -> str:
        out = [f"Machine: {machine}", "",
               "| section | figure | value | floor / peer (same run) | target | met |",
               "|---|---|---|---|---|---|"]
        for r in self.rows:
            met = "" if r["met"] is None else ("yes" if r["met"] else "**NO**")
            out.append(f"| {r['section']} | {r['figure']} | {r['value']} | {r['reference']} "
                       f"| {r['target']} | {met} |")
        if self.notes:
            out += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def ms(seconds) -> str:
    return f"{seconds * 1000:.1f} ms"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# -- the bench's own install of the runner ------------------------------------

def bench_venv() -> Path:
    """A fresh venv with this checkout installed the way users get it."""
    venv = CACHE / "venv"
    py = venv / "bin" / "python"
    if not (py.exists() and subprocess.run([str(py), "-c", "import yaml, croniter"],
                                           capture_output=True).returncode == 0):
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or shutil.which("python3")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        pip(py, "pyyaml", "croniter", "setuptools>=61", "wheel")
    # Reinstall the package every time from a copy of the source (the working
    # tree is shared; building in it would leave build/ and egg-info behind).
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy(REPO / "pyproject.toml", src)
        shutil.copytree(REPO / "worker", src / "worker",
                        ignore=shutil.ignore_patterns("__pycache__"))
        readme = REPO / "README.md"
        (src / "README.md").write_text(readme.read_text() if readme.exists() else "akm-worker\n")
        pip(py, "--no-deps", "--no-build-isolation", "--force-reinstall", str(src))
    # Byte-compile now, as a package install in the image does, so the first
    # timed run does not pay for it.
    subprocess.run([str(py), "-m", "compileall", "-q", str(site_packages(py) / "worker")],
                   check=True)
    return venv


def pip(py, *args):
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                   check=True)


def site_packages(py) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


class Env:
    """How to call the bench install of `akm` against a stash."""

    def __init__(self, venv: Path):
        self.py = str(venv / "bin" / "python")
        self.akm = str(venv / "bin" / "akm")

    def environ(self, stash, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
        env.update(AKM_STASH=str(stash), BENCH_SECRET=SECRET, **extra)
        return env


def timed(argv, env=None, stdout=subprocess.DEVNULL, check=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=stdout, stderr=subprocess.PIPE)
    took = time.perf_counter() - t0
    if check is not None and r.returncode not in check:
        raise SystemExit(f"{argv[:4]} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return took


def peak_rss_kb(e: Env, argv, env) -> int:
    out = subprocess.run([e.py, "-c", RSS_WRAPPER, *argv], env=env, capture_output=True,
                         text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def write_task(stash: Path, task_id: str, text: str):
    (stash / "tasks").mkdir(parents=True, exist_ok=True)
    (stash / "tasks" / f"{task_id}.yml").write_text(text)


# -- per-run overhead -------------------------------------------------------------

def bench_overhead(e: Env, res: Results, tmp: Path, n: int):
    print(f"per-run overhead ({n} runs each, interleaved)", flush=True)
    stash = tmp / "overhead"
    write_task(stash, "noop", 'schedule: "@hourly"\ncommand: "true"\n')
    env = e.environ(stash)
    chronic = shutil.which("chronic")
    cases = {"akm": [e.akm, "tasks", "run", "noop"], "sh": ["/bin/sh", "-c", "true"],
             "python": [e.py, "-c", "pass"]}
    if chronic:
        cases["chronic"] = [chronic, "true"]
    times = {k: [] for k in cases}
    for k, argv in cases.items():          # warm-up: page cache, .pyc
        timed(argv, env)
    for _ in range(n):
        for k, argv in cases.items():
            times[k].append(timed(argv, env, check=(0,)))
    m = {k: median(v) for k, v in times.items()}
    over = m["akm"] - m["sh"]
    res.raw["overhead"] = {k: {"median_s": m[k], "p90_s": pct(v, 90), "n": len(v)}
                           for k, v in times.items()}
    res.add("per run", "`akm tasks run` of `true`", ms(m["akm"]), f"`sh -c true` {ms(m['sh'])}")
    res.add("per run", "overhead over the floor", f"+{ms(over)}",
            f"{m['akm'] / m['sh']:.1f}x the floor", "<= 40 ms", over <= 0.040)
    res.add("per run", "interpreter start alone (`python -c pass`, bench venv)", ms(m["python"]))
    if chronic:
        res.add("per run", "`chronic true` (moreutils)", ms(m["chronic"]),
                f"akm is {m['akm'] / m['chronic']:.1f}x chronic")
    else:
        res.note("chronic (moreutils) is not installed: the chronic peer was skipped "
                 "(`apt-get install moreutils`; .ci/prepare installs it)")
    rss = [peak_rss_kb(e, cases["akm"], env) for _ in range(5)]
    res.raw["overhead"]["akm_peak_rss_kb"] = rss
    res.add("per run", "peak RSS of `akm tasks run`", f"{max(rss) / 1024:.1f} MB",
            f"python -c pass {peak_rss_kb(e, cases['python'], env) / 1024:.1f} MB",
            "< 30 MB", max(rss) < 30 * 1024)
    db = stash / "state.db"
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone()[0]
    res.raw["overhead"]["runs_recorded"] = rows


# -- output throughput ---------------------------------------------------------

def make_output_file(path: Path, size: int):
    """Realistic text: 1000-character base64 lines (a log, a transcript)."""
    if path.exists() and path.stat().st_size == size:
        return
    subprocess.run(f"base64 -w 1000 /dev/urandom | head -c {size} > {path}.tmp && mv {path}.tmp {path}",
                   shell=True, check=True)


def bench_output(e: Env, res: Results, tmp: Path, sizes: list[tuple[int, int]]):
    print("output throughput (masking on)", flush=True)
    big = max(s for s, _ in sizes)
    data = CACHE / f"output-{big}.txt"      # regenerated only when the size changes
    make_output_file(data, big)
    stash = tmp / "output"
    raw = {}
    for size, repeat in sizes:
        tid = f"out-{size // MiB}m"
        # A secret in env turns masking on; the command prints it once at the
        # end, and the log must show *** instead.
        write_task(stash, tid, f'schedule: "@hourly"\ntimeout: 3600\n'
                               f'env:\n  MY_TOKEN: "${{BENCH_SECRET}}"\n'
                               f'command: head -c {size} {data}; echo "token=$MY_TOKEN"\n')
        env = e.environ(stash)
        floor_out = tmp / "floor.out"
        runner, floor, rss = [], [], []
        for _ in range(repeat):
            floor.append(timed(["/bin/sh", "-c", f"head -c {size} {data} > {floor_out}"], env))
            floor_out.unlink()
            runner.append(timed([e.akm, "tasks", "run", tid], env, check=(0,)))
            leaked = _check_and_drop_logs(stash, tid)
            rss.append(peak_rss_kb(e, [e.akm, "tasks", "run", tid], env))
            leaked |= _check_and_drop_logs(stash, tid)
            if leaked:
                res.note(f"SECRET LEAKED in the {tid} run log")
        mbps = size / median(runner) / 1e6
        fmbps = size / median(floor) / 1e6
        raw[size] = {"runner_s": runner, "floor_s": floor, "peak_rss_kb": rss}
        label = f"{size / MiB:,.0f} MiB" if size < 1 << 30 else f"{size / (1 << 30):g} GiB"
        # The target is about streaming: judged at the largest size, where
        # the runner's ~40 ms start-up no longer dominates.
        judged = size == big
        res.add("output", f"{label} through the runner (n={repeat})", f"{mbps:,.0f} MB/s",
                f"`head > file` {fmbps:,.0f} MB/s ({mbps / fmbps:.2f}x)",
                ">= 200 MB/s" if judged else "", (mbps >= 200) if judged else None)
        res.add("output", f"peak RSS at {label}", f"{max(rss) / 1024:.1f} MB")
    peaks = [max(v["peak_rss_kb"]) for v in raw.values()]
    flat = max(peaks) - min(peaks) < 2048
    res.add("output", "memory flat from smallest to largest output",
            f"{min(peaks) / 1024:.1f} -> {max(peaks) / 1024:.1f} MB", "", "growth < 2 MB", flat)
    db = stash / "state.db"
    res.raw["output"] = {str(k): v for k, v in raw.items()}
    res.raw["output"]["state_db_bytes"] = db.stat().st_size
    res.add("output", "state.db after all the output runs", f"{db.stat().st_size / 1024:.0f} KiB",
            "tails bounded at 64 KiB per stream")


def _check_and_drop_logs(stash: Path, tid: str) -> bool:
    """True if the secret is in the run's log; the log is deleted (they are big)."""
    leaked = False
    for log in (stash / "logs" / "tasks" / tid).glob("*.log"):
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            tail = f.read()
        if SECRET.encode() in tail or b"token=***" not in tail:
            leaked = True
        log.unlink()
    return leaked


# -- state.db: health and runs at 10k..1M rows ---------------------------------

STATUS_WEIGHTS = [("success", 930), ("failed", 40), ("timeout", 8), ("error", 5),
                  ("skipped", 10), ("interrupted", 4), ("abandoned", 3)]
STDOUT_TAILS = ["fetched {a} items from the feed\nwrote notes/{d}.md ({b} lines)\n",
                "checked {a} repositories, {b} updates\nsummary posted\n",
                "agent finished in {a} steps\nprompt_tokens={b}\n",
                ""]


def build_db(root: Path, rows: int, tasks: int = 50, span_h: float = 48.0) -> dict:
    """ROWS runs across TASKS tasks, spread evenly over the last SPAN_H hours,
    oldest first (ids grow with time as in a real state.db), with realistic
    statuses, token counts and small stdout tails."""
    sys.path.insert(0, str(REPO))
    from worker import clock, state
    from worker.stash import Stash
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    for i in range(tasks):
        (root / "tasks" / f"task-{i:03d}.yml").write_text(
            f"schedule: '*/5 * * * *'\ncommand: echo {i}\ntoken_budget: 8000\n")
    conn = state.connect(Stash(root))
    now = time.time()
    start = now - span_h * 3600
    step = span_h * 3600 / rows
    rng = random.Random(5)
    statuses = [s for s, w in STATUS_WEIGHTS for _ in range(w)]

    def gen():
        for k in range(rows):
            t = f"task-{k % tasks:03d}"
            s = start + k * step
            status = rng.choice(statuses)
            dur = rng.uniform(0.2, 90)
            started, ended = clock.iso(s), clock.iso(s + dur)
            code = {"success": 0, "failed": 1, "timeout": 124, "interrupted": 130}.get(status)
            out = rng.choice(STDOUT_TAILS).format(a=rng.randint(1, 300), b=rng.randint(1, 9000),
                                                  d=time.strftime("%Y-%m-%d", time.gmtime(s)))
            err = "Traceback (most recent call last):\n  ...\nValueError: bad feed\n" \
                if status == "failed" else ""
            tokens = rng.randint(300, 9000) if status in ("success", "failed") else None
            error = {"error": "missing variable FEED_URL (set it in .env)",
                     "abandoned": "the runner vanished", "timeout": "timed out",
                     "interrupted": "interrupted"}.get(status)
            yield (t, "schedule", status, started, ended, code, out, err,
                   tokens and tokens // 3, tokens and tokens - tokens // 3,
                   tokens and tokens * 3e-6, "model-x" if tokens else None,
                   '{"read_file": 3, "web_fetch": 1}' if tokens else None, error,
                   f"logs/tasks/{t}/{clock.compact(s)}-{k + 1}.log")

    t0 = time.monotonic()
    with conn:
        conn.executemany(
            "INSERT INTO runs (task_id, trigger, status, started_at, ended_at, exit_code, "
            "stdout, stderr, prompt_tokens, completion_tokens, cost_usd, model, tools, error, "
            "log_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", gen())
        # One row whose runner is gone: every look pays mark_abandoned.
        conn.execute("INSERT INTO runs (task_id, trigger, status, started_at, runner) "
                     "VALUES ('task-000', 'schedule', 'running', ?, 'gone')", (clock.iso(now),))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = (root / "state.db").stat().st_size
    return {"rows": rows + 1, "build_s": time.monotonic() - t0, "bytes": size}


def time_cmd(e: Env, stash, args, repeat) -> list[float]:
    env = e.environ(stash)
    timed([e.akm, *args], env, check=(0, 1))   # warms the page cache
    return [timed([e.akm, *args], env, check=(0, 1)) for _ in range(repeat)]


def bench_state(e: Env, res: Results, tmp: Path, sizes, repeat):
    print("state.db: akm health / akm runs", flush=True)
    raw = {}
    version = median(time_cmd(e, tmp, ["version"], repeat))
    res.add("state", "`akm version` (start-up alone, for reference)", ms(version))
    for rows in sizes:
        root = tmp / f"state-{rows}"
        info = build_db(root, rows)
        label = f"{rows:,}"
        h24 = time_cmd(e, root, ["health", "--format", "json"], repeat)
        h1 = time_cmd(e, root, ["health", "--format", "json", "--window", "1h"], repeat)
        r = time_cmd(e, root, ["runs", "--format", "json"], repeat)
        rt = time_cmd(e, root, ["runs", "--task", "task-007", "--limit", "50"], repeat)
        raw[rows] = {**info, "health_24h_s": h24, "health_1h_s": h1, "runs_s": r,
                     "runs_task_s": rt}
        last = rows == max(sizes)
        target = "< 300 ms" if rows >= 1_000_000 else ""
        res.add("state", f"`akm health` (24 h window), {label} rows in 48 h", ms(median(h24)),
                f"max {ms(max(h24))}", target, median(h24) < 0.3 if target else None)
        res.add("state", f"`akm health --window 1h`, {label} rows", ms(median(h1)), "",
                target, median(h1) < 0.3 if target else None)
        res.add("state", f"`akm runs`, {label} rows", ms(median(r)), "", target,
                median(r) < 0.3 if target else None)
        res.add("state", f"`akm runs --task ID --limit 50`, {label} rows", ms(median(rt)), "",
                target, median(rt) < 0.3 if target else None)
        res.add("state", f"state.db size per 1,000 runs ({label} rows)",
                f"{info['bytes'] / info['rows'] * 1000 / 1024:.0f} KiB",
                f"{info['bytes'] / 1e6:.0f} MB in all")
        if not last:
            shutil.rmtree(root)
    res.raw["state"] = {str(k): v for k, v in raw.items()}
    # The health engineer's history: 50 tasks every 5 minutes back ~69 days.
    if max(sizes) >= 1_000_000:
        hb = REPO / "bench" / "health_bench.py"
        if hb.exists():
            sys.path.insert(0, str(hb.parent))
            import health_bench
            root = tmp / "state-history"
            health_bench.build(root, max(sizes), 50)
            t = time_cmd(e, root, ["health", "--format", "json"], repeat)
            res.add("state", f"`akm health`, {max(sizes):,} rows over ~69 days "
                    "(bench/health_bench.py's history)", ms(median(t)), "", "< 300 ms",
                    median(t) < 0.3)
            res.raw["state"]["history"] = t
            shutil.rmtree(root)
    res.note("state rows: 50 tasks, statuses ~93% success / 4% failed / 1% skipped / "
             "timeout, error, interrupted, abandoned; small stdout tails; spread evenly "
             "over 48 h, so the 24 h window holds half the table (a worst case: a real "
             "worker with 1M rows has them over weeks; see the ~69-day row)")


# -- fan-out: 100 tasks due in the same second -----------------------------------

def bench_fanout(e: Env, res: Results, tmp: Path, n: int, repeat: int):
    print(f"fan-out: {n} runs started at once", flush=True)
    walls, exits, ok = [], [], True
    locked = 0
    for rep in range(repeat):
        stash = tmp / f"fanout-{rep}"      # a fresh stash: state.db is created in the race
        for i in range(n):
            write_task(stash, f"t{i:03d}", f'schedule: "* * * * * * *"\ncommand: echo run {i}\n')
        env = e.environ(stash)
        t0 = time.time()
        procs = [subprocess.Popen([e.akm, "tasks", "run", f"t{i:03d}", "--trigger", "schedule"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i in range(n)]
        errs = [p.communicate()[1].decode(errors="replace") for p in procs]
        exits.append(time.time() - t0)
        locked += sum("locked" in s for s in errs)
        conn = sqlite3.connect(stash / "state.db")
        rows = conn.execute("SELECT status, ended_at FROM runs").fetchall()
        conn.close()
        done = [r for r in rows if r[0] == "success" and r[1]]
        ok &= len(done) == n and all(p.returncode == 0 for p in procs)
        last = max(datetime.fromisoformat(r[1].replace("Z", "+00:00")).timestamp() for r in done)
        walls.append(last - t0)
        shutil.rmtree(stash)
    res.raw["fanout"] = {"n": n, "wall_to_last_row_s": walls, "all_exited_s": exits,
                         "locked_messages": locked, "all_recorded": ok}
    res.add("fan-out", f"{n} runs started in the same second: all recorded `success`",
            "yes" if ok else "NO", f"{repeat} rounds", "all", ok)
    res.add("fan-out", "wall time until the last row is complete", f"{median(walls):.2f} s",
            f"all runners exited {median(exits):.2f} s")
    res.add("fan-out", "\"database is locked\" messages", str(locked), "", "0", locked == 0)


# -- schedule: crontab for 1,000 task files ---------------------------------------

def bench_schedule(e: Env, res: Results, tmp: Path, n: int, repeat: int):
    print(f"schedule: {n} task files", flush=True)
    stash = tmp / "schedule"
    rng = random.Random(7)
    kinds = ["*/5 * * * *", "0 * * * *", "@hourly", "@daily", "*/10 * * * * * *",
             "15 3 * * 1-5", "0 0 1 * *", "30 */2 * * *", "0 9 * * mon"]
    for i in range(n):
        enabled = "false" if i % 20 == 0 else "true"
        write_task(stash, f"task-{i:04d}", f'schedule: "{rng.choice(kinds)}"\nenabled: {enabled}\n'
                                          f'command: "echo {i}"\ntimeout: 600\n'
                                          f'description: task number {i}\n')
    install = time_cmd(e, stash, ["tasks", "install", "--print"], repeat)
    validate = time_cmd(e, stash, ["tasks", "validate"], repeat)
    out = subprocess.run([e.akm, "tasks", "install", "--print"], env=e.environ(stash),
                         capture_output=True, text=True).stdout
    lines = [x for x in out.splitlines() if x.strip() and not x.startswith("#")]
    res.raw["schedule"] = {"files": n, "install_print_s": install, "validate_s": validate,
                           "crontab_lines": len(lines)}
    sc = "with `supercronic -test` on every line" if shutil.which("supercronic") else \
        "supercronic not installed: lines not confirmed"
    res.add("schedule", f"`akm tasks install --print`, {n} files ({len(lines)} lines)",
            ms(median(install)), sc, "< 1 s", median(install) < 1.0)
    res.add("schedule", f"`akm tasks validate`, {n} files", ms(median(validate)), "",
            "< 1 s", median(validate) < 1.0)


# -- the image ---------------------------------------------------------------------

def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def bench_image(res: Results, tmp: Path, seconds: int):
    print(f"image: every-second task over {seconds} s", flush=True)
    if not engine_answers():
        res.note("image figures skipped: no Docker engine answers (run .ci/prepare)")
        return
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        res.note(f"image figures skipped: no {IMAGE} image (build it: `docker build -t {IMAGE} .`)")
        return
    figures = REPO / "bench" / "image_figures.py"
    if figures.exists():
        # The image engineer's script: size over base, `docker run` to first run.
        sys.path.insert(0, str(figures.parent))
        import image_figures
        f = image_figures.figures(repeats=3 if seconds < 60 else 5, delay_seconds=0)
        res.raw["image_figures"] = f
        res.add("image", "size added over its base (debian:trixie-slim)", f"{f['added_mb']:.0f} MB",
                f"image {f['image_mb']:.0f} MB, local base {f['base_mb']:.0f} MB")
        res.add("image", f"`docker run` to the first run of an every-second task "
                f"(median of {f['repeats']})", f"{f['start_to_first_run_s']:.2f} s",
                f"scheduler ready after {f['start_to_scheduler_ready_s']} s; includes up to "
                "1 s waiting for the next whole second")
    else:
        res.note("bench/image_figures.py is not in the tree: image size over base measured "
                 "here from `docker image inspect`")
        _image_size(res)
    _image_overhead(res, 30 if seconds < 60 else 100)
    _every_second(res, tmp, seconds)


# Runs inside the image, with its own Python: the per-run overhead there.
IMAGE_OVERHEAD = r"""
import json, os, resource, statistics, subprocess, sys, time
n = int(sys.argv[1])
os.makedirs("/tmp/s/tasks", exist_ok=True)
open("/tmp/s/tasks/noop.yml", "w").write('schedule: "@hourly"\ncommand: "true"\n')
env = dict(os.environ, AKM_STASH="/tmp/s")
cases = {"akm": ["/opt/akm/venv/bin/akm", "tasks", "run", "noop"],
         "sh": ["/bin/sh", "-c", "true"], "python": ["/opt/akm/venv/bin/python", "-c", "pass"]}
t = {k: [] for k in cases}
for i in range(n + 1):
    for k, argv in cases.items():
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        if i:
            t[k].append(time.perf_counter() - t0)
print(json.dumps({k: statistics.median(v) for k, v in t.items()}))
"""


def _image_overhead(res, n):
    argv = ["docker", "run", "--rm", "--entrypoint", "/opt/akm/venv/bin/python", IMAGE,
            "-c", IMAGE_OVERHEAD, str(n)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode:
        res.note(f"in-image per-run overhead skipped: {r.stderr.strip()[-300:]}")
        return
    m = json.loads(r.stdout.strip().splitlines()[-1])
    rss = subprocess.run(["docker", "run", "--rm", "-e", "AKM_STASH=/tmp/s", "--entrypoint",
                          "/bin/sh", IMAGE, "-c",
                          "mkdir -p /tmp/s/tasks && printf 'schedule: \"@hourly\"\\ncommand: "
                          "\"true\"\\n' > /tmp/s/tasks/noop.yml && /opt/akm/venv/bin/akm tasks "
                          "run noop && exec /opt/akm/venv/bin/python -c \"$0\" /opt/akm/venv/bin/akm "
                          "tasks run noop", RSS_WRAPPER],
                         capture_output=True, text=True, timeout=120)
    res.raw["image_overhead"] = {**m, "n": n, "rss": rss.stdout.strip()}
    over = m["akm"] - m["sh"]
    res.add("image", f"`akm tasks run` of `true` inside the image (n={n})", ms(m["akm"]),
            f"`sh -c true` {ms(m['sh'])}; python -c pass {ms(m['python'])}")
    res.add("image", "per-run overhead over the floor, inside the image", f"+{ms(over)}",
            f"{m['akm'] / m['sh']:.1f}x the floor", "<= 40 ms", over <= 0.040)
    if rss.returncode == 0 and rss.stdout.strip():
        kb = int(rss.stdout.strip().splitlines()[-1])
        res.add("image", "peak RSS of `akm tasks run`, inside the image", f"{kb / 1024:.1f} MB",
                "", "< 30 MB", kb < 30 * 1024)


def _image_size(res):
    def size(ref):
        out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", ref],
                             capture_output=True, text=True)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    img, base = size(IMAGE), size("debian:trixie-slim")
    if img and base:
        res.add("image", "size added over debian:trixie-slim", f"{(img - base) / 1e6:.0f} MB",
                f"image {img / 1e6:.0f} MB, local base {base / 1e6:.0f} MB")


def _every_second(res, tmp, seconds):
    stash = tmp / "image-stash"
    write_task(stash, "every-second", 'schedule: "* * * * * * *"\ncommand: "true"\n')
    puid = os.getuid() or 1000
    pgid = os.getgid() or 1000
    for d, _, files in os.walk(stash):
        for p in [d] + [os.path.join(d, f) for f in files]:
            if os.getuid() == 0:
                os.chown(p, puid, pgid)
    name = f"akm-bench-{os.getpid()}"
    cid = subprocess.run(["docker", "run", "-d", "--name", name, "-e", f"PUID={puid}",
                          "-e", f"PGID={pgid}", "-v", f"{stash}:/stash", IMAGE],
                         capture_output=True, text=True)
    if cid.returncode:
        res.note(f"image every-second run skipped: docker run failed: {cid.stderr.strip()[-300:]}")
        return
    try:
        time.sleep(seconds)
        started = subprocess.run(["docker", "inspect", "-f", "{{.State.StartedAt}}", name],
                                 capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    conn = sqlite3.connect(stash / "state.db")
    rows = conn.execute("SELECT started_at, status FROM runs WHERE task_id = 'every-second' "
                        "ORDER BY id").fetchall()
    conn.close()
    if len(rows) < 3:
        res.note(f"image every-second run: only {len(rows)} runs recorded")
        return
    ts = [datetime.fromisoformat(r[0].replace("Z", "+00:00")).timestamp() for r in rows]
    # The scheduled second is the whole second the run started in: a delay
    # of a second or more would show as missed seconds below.
    delays = [t - int(t) for t in ts]
    span = int(ts[-1]) - int(ts[0]) + 1
    seconds_hit = len({int(t) for t in ts})
    res.raw["image_every_second"] = {"runs": len(rows), "span_s": span, "delays_s": delays,
                                     "statuses": sorted({r[1] for r in rows}),
                                     "container_started": started}
    res.add("image", f"every-second task: start delay p50 (n={len(rows)}, {seconds} s)",
            ms(pct(delays, 50)), "started_at minus its scheduled second")
    res.add("image", "every-second task: start delay p99", ms(pct(delays, 99)),
            f"max {ms(max(delays))}")
    res.add("image", "every-second task: seconds that got a run", f"{seconds_hit} of {span}",
            "", "all", seconds_hit == span)


# -- main ----------------------------------------------------------------------------

def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    osname = platform.freedesktop_os_release().get("PRETTY_NAME", "?") \
        if hasattr(platform, "freedesktop_os_release") else "?"
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {osname}, kernel "
            f"{platform.release()}, Python {platform.python_version()}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the CI version (about a minute)")
    p.add_argument("--only", help="comma list of: overhead,output,state,fanout,schedule,image")
    p.add_argument("--no-image", action="store_true", help="skip the image figures")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args()
    q = args.quick
    only = set(args.only.split(",")) if args.only else None

    def want(name):
        return (only is None or name in only) and not (name == "image" and args.no_image)

    CACHE.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    print("installing this checkout into the bench venv (non-editable)", flush=True)
    e = Env(bench_venv())
    res = Results()
    with tempfile.TemporaryDirectory(prefix="akm-bench-") as tmp:
        tmp = Path(tmp)
        if want("overhead"):
            bench_overhead(e, res, tmp, 30 if q else 200)
        if want("output"):
            bench_output(e, res, tmp, [(10 * MiB, 3), (100 * MiB, 2)] if q
                         else [(10 * MiB, 7), (100 * MiB, 5), (1 << 30, 3)])
        if want("state"):
            bench_state(e, res, tmp, [10_000, 100_000] if q else [10_000, 100_000, 1_000_000],
                        3 if q else 7)
        if want("fanout"):
            bench_fanout(e, res, tmp, 100, 1 if q else 3)
        if want("schedule"):
            bench_schedule(e, res, tmp, 1000, 3 if q else 7)
        if want("image"):
            bench_image(res, tmp, 20 if q else 150)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    res.note(f"commit {commit} (working tree as it was), {'--quick' if q else 'full'} run, "
             f"{time.monotonic() - t_start:.0f} s, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"re-run: `.venv/bin/python bench/run.py{' --quick' if q else ''}`")
    md = res.markdown(machine())
    print()
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if q and args.out == str(RESULTS) else "latest"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine(), "quick": q, "rows": res.rows, "notes": res.notes,
         "raw": res.raw}, indent=1, default=str) + "\n")
    missed = [r for r in res.rows if r["met"] is False]
    print(f"{len(missed)} target(s) missed" if missed else "every target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
