"""The container's main process: `akm scheduler` (PID 1) and `akm healthcheck`.

Why not supercronic as PID 1: on SIGTERM it waits for its jobs forever and
sends them nothing, and a reload (SIGUSR2) waits for every running job. So a
small supervisor sits above it:

- writes the crontab from the valid, enabled task files (worker.crontab) and
  reports invalid files, one line each, on the container log;
- runs supercronic as its child; crontab lines use `--detach`, so a job ends
  at once and supercronic never waits on a task;
- polls tasks/ (names, sizes, mtimes) and, when it changes, rewrites the
  crontab atomically and sends SIGUSR2 (supercronic re-reads it at once);
- reaps every zombie: detached runners are reparented to PID 1 (or to us as
  a child subreaper when we are not PID 1, e.g. in tests);
- on SIGTERM/SIGINT stops reloading, sends SIGTERM to every process (runners
  forward it to their tasks and record `interrupted`), waits for them up to
  AKM_STOP_TIMEOUT seconds, then SIGKILLs what is left and exits;
- runs `akm prune --older-than ${AKM_RETENTION_DAYS}d` once a day if set;
- keeps a status file that `akm healthcheck` reads.

Signal handlers only set flags (and wake the loop through a pipe); the loop
acts on them, so nothing unsafe ever runs inside a handler.
"""

import json
import os
import select
import signal
import sys
import time
from pathlib import Path

from .errors import AkmError, UsageError
from .stash import Stash

POLL_SECONDS = 5.0          # tasks/ check interval: a change is live within ~5 s
HEARTBEAT_SECONDS = 15.0    # status file refresh
STALE_SECONDS = 90.0        # healthcheck: a heartbeat older than this means a stuck loop
PRUNE_EVERY = 86400.0
REPORT_CHECK_EVERY = 3600.0  # the Discord report failing: said on this log hourly
DEFAULT_STOP_TIMEOUT = 20.0
DEFAULT_RUN_DIR = "/tmp/akm"


def _log(msg: str) -> None:
    # One write per line: supercronic and the runners share this pipe.
    sys.stdout.write(f"akm scheduler: {msg}\n")
    sys.stdout.flush()


def run_dir() -> Path:
    return Path(os.environ.get("AKM_RUN_DIR") or DEFAULT_RUN_DIR)


def status_path() -> Path:
    return run_dir() / "scheduler.json"


def crontab_path() -> Path:
    return Path(os.environ.get("AKM_CRONTAB") or run_dir() / "crontab")


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise UsageError(f"{name}={raw!r} must not be negative")
    return value


def retention_days() -> int | None:
    raw = os.environ.get("AKM_RETENTION_DAYS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) == 0:
        raise UsageError(f"AKM_RETENTION_DAYS={raw!r}: give a whole number of days > 0, "
                         f"or leave it empty to keep every run")
    return int(raw)


def tasks_fingerprint(tasks_dir: Path) -> tuple:
    """What a change in tasks/ looks like: names, sizes, mtimes (ns).
    `git pull`, an editor's rename-into-place, touch and rm all change it."""
    try:
        entries = list(os.scandir(tasks_dir))
    except FileNotFoundError:
        return ("missing",)
    except NotADirectoryError:
        return ("not a directory",)
    out = []
    for e in entries:
        try:
            st = e.stat()
        except OSError:
            continue
        out.append((e.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


# -- processes -----------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process we can see."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(name)] = (int(fields[1]), fields[0])
    return table


def others(me: int | None = None) -> list[int]:
    """The live processes a stop must wait for. As PID 1 that is every other
    process in the container (including `docker exec` runs); elsewhere, our
    descendants. Zombies do not count: they are waiting to be reaped."""
    me = me or os.getpid()
    table = _proc_table()
    if me == 1:
        # Only what kill(-1) can reach: a root `docker exec` shell would
        # otherwise hold up every stop until the timeout.
        uid = os.getuid()
        return sorted(p for p, (_, st) in table.items()
                      if p != 1 and st != "Z" and (uid == 0 or _owner(p) == uid))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [me]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if table[child][1] != "Z":
                found.append(child)
    return sorted(found)


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def signal_all(sig: int) -> None:
    """SIGTERM/SIGKILL every other process: kill(-1) as PID 1 (it skips us),
    our descendants otherwise (kill(-1) on a host would hit the whole user)."""
    if os.getpid() == 1:
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            pass
        return
    for pid in others():
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _become_subreaper() -> None:
    # Outside a container the detached runners would be reparented to the
    # host's init; as a subreaper they come to us, so we can reap and stop them.
    if os.getpid() == 1 or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _akm_command() -> list[str]:
    beside = Path(sys.executable).with_name("akm")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "worker.cli"]


# -- the supervisor ----------------------------------------------------------------

class Scheduler:
    def __init__(self, stash: Stash, crontab: Path, status: Path,
                 poll: float = POLL_SECONDS, stop_timeout: float = DEFAULT_STOP_TIMEOUT,
                 retention: int | None = None, supercronic: str = "supercronic"):
        self.stash = stash
        self.crontab = crontab
        self.status = status
        self.poll = poll
        self.stop_timeout = stop_timeout
        self.retention = retention
        self.supercronic_bin = supercronic
        self.supercronic_pid: int | None = None
        self.prune_pid: int | None = None
        self.fingerprint: tuple | None = None
        self.started_at = time.time()
        self.loaded_at: float | None = None
        self.reloads = 0
        self._said_empty = False        # said "nothing is scheduled" for the current state
        self.stop_requested = 0         # count of SIGTERM/SIGINT seen
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # signal handlers: flags only
    def _on_stop(self, signum, frame):
        self.stop_requested += 1

    def _on_child(self, signum, frame):
        pass  # the wakeup fd already woke the loop; reaping happens there

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGCHLD, self._on_child)

    def _sleep(self, seconds: float) -> None:
        try:
            select.select([self._wake_r], [], [], max(0.0, seconds))
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # crontab
    def write_crontab(self) -> bool:
        """(Re)write the crontab from tasks/; True when its content changed."""
        from . import crontab
        if not self.stash.tasks_dir.is_dir():
            _log(f"no tasks directory at {self.stash.tasks_dir}: nothing is scheduled "
                 f"(add task files there; they are picked up within {self.poll:g} s)")
        try:
            _, changed, problems = crontab.install(self.stash, self.crontab)
        except AkmError as e:
            _log(f"crontab not updated: {e}")
            if not self.crontab.exists():
                self._write_empty_crontab()
                return True
            return False
        for problem in problems:
            _log(f"invalid: {problem}")
        empty = self.stash.tasks_dir.is_dir() and self._count() == 0
        if empty and not self._said_empty:
            _log(f"no valid, enabled task files in {self.stash.tasks_dir}: nothing is scheduled "
                 f"(new files are picked up within {self.poll:g} s)")
        self._said_empty = empty
        return changed

    def _write_empty_crontab(self) -> None:
        from . import crontab
        try:
            crontab.write_atomic(self.crontab, "# akm-worker: no valid tasks\n")
        except AkmError as e:
            _log(str(e))  # supercronic then says it has no crontab, and we exit

    def check_tasks(self, force: bool = False) -> None:
        fp = tasks_fingerprint(self.stash.tasks_dir)
        if fp == self.fingerprint and not force:
            return
        first = self.fingerprint is None
        self.fingerprint = fp
        changed = self.write_crontab()
        if not first and changed and self.supercronic_pid:
            os.kill(self.supercronic_pid, signal.SIGUSR2)
            self.reloads += 1
            _log(f"tasks changed: crontab rewritten, supercronic reloading ({self._count()} scheduled)")
        if changed or first:
            self.loaded_at = time.time()
            self.write_status()

    def _count(self) -> int:
        try:
            return sum(1 for line in self.crontab.read_text().splitlines()
                       if line.strip() and not line.lstrip().startswith("#"))
        except OSError:
            return 0

    # children
    def start_supercronic(self) -> None:
        env = dict(os.environ)
        # Detached runners write their output straight to our stdout, the
        # container's log (/proc/1/fd/1 in the image).
        env.setdefault("AKM_LOG_SINK", f"/proc/{os.getpid()}/fd/1")
        _check_sink(env["AKM_LOG_SINK"])
        # Crontab lines say `akm`: make it this installation's akm.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        # -quiet: its "job succeeded" lines would only mean "the detached
        # runner forked"; the runs themselves are in state.db and the log.
        # Warnings and errors still show. AKM_SUPERCRONIC_VERBOSE=1 for all.
        verbose = os.environ.get("AKM_SUPERCRONIC_VERBOSE") == "1"
        # -no-reap: we reap (its own reaping needs PID 1, and it warns without).
        argv = [self.supercronic_bin, "-no-reap", "-passthrough-logs",
                "-debug" if verbose else "-quiet", str(self.crontab)]
        try:
            self.supercronic_pid = os.posix_spawnp(self.supercronic_bin, argv, env)
        except OSError as e:
            raise AkmError(f"cannot start supercronic ({e}): is it installed and on PATH?") from None
        self.loaded_at = time.time()
        _log(f"supercronic started (pid {self.supercronic_pid}, crontab {self.crontab}, "
             f"{self._count()} scheduled, TZ={os.environ.get('TZ') or 'UTC'})")
        self.write_status()

    def start_prune(self) -> None:
        if self.prune_pid is not None:
            return
        argv = _akm_command() + ["prune", "--older-than", f"{self.retention}d"]
        env = dict(os.environ, AKM_STASH=str(self.stash.root))
        try:
            self.prune_pid = os.posix_spawn(argv[0], argv, env)
        except OSError as e:
            _log(f"prune not started: {e}")

    def reap(self) -> int | None:
        """Reap every exited child; return supercronic's wait status if it died."""
        died = None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return died
            if pid == 0:
                return died
            if pid == self.supercronic_pid:
                self.supercronic_pid = None
                died = status
            elif pid == self.prune_pid:
                self.prune_pid = None
                if os.waitstatus_to_exitcode(status) != 0:
                    _log(f"prune exited {os.waitstatus_to_exitcode(status)}")

    def write_status(self, state: str = "running") -> None:
        data = {
            "pid": os.getpid(), "state": state,
            "supercronic_pid": self.supercronic_pid,
            "crontab": str(self.crontab),
            "stash": str(self.stash.root),
            "started_at": self.started_at, "loaded_at": self.loaded_at,
            "reloads": self.reloads, "heartbeat": time.time(),
        }
        try:
            self.status.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status.with_name(self.status.name + ".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.status)
        except OSError as e:
            _log(f"cannot write status file {self.status}: {e}")

    def record_start(self) -> None:
        # health's `late` counts a never-run task from when the worker started.
        # Nice to have, never fatal: a read-only or damaged state.db must not
        # turn PID 1 into a crash loop (the runs report that problem themselves).
        import sqlite3
        try:
            from . import clock, state
            conn = state.connect(self.stash)
            try:
                state.set_meta(conn, "scheduler_started_at", clock.iso(self.started_at))
            finally:
                conn.close()
        except (AkmError, ImportError, AttributeError, OSError, sqlite3.Error) as e:
            _log(f"could not record the start in state.db: {e}")

    def check_reports(self) -> None:
        """Say on the worker's own log when the Discord report has been failing
        for hours: the sidecar's log is not where people look first."""
        import sqlite3
        try:
            from datetime import datetime, timezone

            from . import health, state
            conn = state.connect(self.stash, readonly=True)
            if conn is None:
                return
            try:
                problem = health.report_failing(conn, datetime.now(timezone.utc))
            finally:
                conn.close()
        except (AkmError, OSError, sqlite3.Error) as e:
            _log(f"could not check the report's state: {e}")
            return
        if problem:
            _log(f"health report: {problem.detail} (docker compose logs report)")

    # the loop
    def run(self, now=time.monotonic) -> int:
        self.install_signals()
        _become_subreaper()
        self.record_start()
        self.check_tasks(force=True)
        self.start_supercronic()
        next_poll = now() + self.poll
        next_beat = now() + HEARTBEAT_SECONDS
        next_prune = now() + 60.0 if self.retention else None  # let the first runs start
        next_report_check = now() + REPORT_CHECK_EVERY
        while not self.stop_requested:
            died = self.reap()
            if died is not None:
                code = os.waitstatus_to_exitcode(died)
                _log(f"supercronic exited unexpectedly ({_describe(code)}); stopping so the "
                     f"restart policy starts a fresh container")
                self.write_status("failed")
                self.shutdown()
                return 1
            t = now()
            if t >= next_poll:
                self.check_tasks()
                next_poll = t + self.poll
            if t >= next_beat:
                self.write_status()
                next_beat = t + HEARTBEAT_SECONDS
            if next_prune is not None and t >= next_prune:
                self.start_prune()
                next_prune = t + PRUNE_EVERY
            if t >= next_report_check:
                self.check_reports()
                next_report_check = t + REPORT_CHECK_EVERY
            deadlines = [next_poll, next_beat, next_report_check] + ([next_prune] if next_prune else [])
            self._sleep(min(deadlines) - now())
        _log("stop requested: telling every task to stop")
        self.write_status("stopping")
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """SIGTERM everyone, wait up to stop_timeout (a second SIGTERM
        cuts it short), then SIGKILL what is left."""
        signal_all(signal.SIGTERM)
        seen = self.stop_requested
        deadline = time.monotonic() + self.stop_timeout
        left = others()
        while left and time.monotonic() < deadline and self.stop_requested <= max(seen, 1):
            self.reap()
            self._sleep(min(0.2, deadline - time.monotonic()))
            left = others()
        if left:
            _log(f"{len(left)} process(es) still running after {self.stop_timeout:g} s: killing them")
            signal_all(signal.SIGKILL)
            end = time.monotonic() + 2.0
            while others() and time.monotonic() < end:
                self.reap()
                time.sleep(0.05)
        self.reap()
        self.write_status("stopped")
        _log("stopped")


def _check_sink(path: str) -> None:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as e:
        _log(f"task output cannot reach the container log ({path}: {e.strerror}); runs are "
             f"still recorded in state.db and logs/. Start the container as root (the "
             f"default) and let PUID/PGID choose the user, rather than `user:`")


def _describe(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


# -- CLI ----------------------------------------------------------------------------

def cmd_scheduler(args) -> int:
    stash = Stash.resolve(args.stash)
    sched = Scheduler(
        stash, crontab_path(), status_path(),
        poll=_float_env("AKM_POLL_SECONDS", POLL_SECONDS) or POLL_SECONDS,
        stop_timeout=_float_env("AKM_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT),
        retention=retention_days(),
        supercronic=os.environ.get("AKM_SUPERCRONIC", "supercronic"))
    _log(f"stash {stash.root}, polling {stash.tasks_dir} every {sched.poll:g} s, "
         f"stop timeout {sched.stop_timeout:g} s"
         + (f", pruning runs older than {sched.retention} days daily" if sched.retention else ""))
    return sched.run()


def health_problem(status_file: Path, now: float | None = None) -> str | None:
    """Why the scheduler is unhealthy, or None when it is fine."""
    now = time.time() if now is None else now
    try:
        data = json.loads(status_file.read_text())
    except (OSError, ValueError) as e:
        return f"no scheduler status at {status_file} ({e.__class__.__name__}): is `akm scheduler` running?"
    if data.get("state") != "running":
        return f"scheduler is {data.get('state')}"
    pid = data.get("supercronic_pid")
    if not pid or not _is_supercronic(pid):
        return "supercronic is not running"
    if not data.get("loaded_at") or not Path(data.get("crontab", "")).is_file():
        return f"crontab {data.get('crontab')} is not loaded"
    age = now - float(data.get("heartbeat") or 0)
    if age > STALE_SECONDS:
        return f"scheduler heartbeat is {age:.0f} s old (loop stuck?)"
    return None


def _is_supercronic(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    return "supercronic" in stat[:stat.rfind(")")] and fields[0] != "Z"


def cmd_healthcheck(args) -> int:
    problem = health_problem(status_path())
    if problem:
        print(f"unhealthy: {problem}")
        return 1
    print("ok")
    return 0
