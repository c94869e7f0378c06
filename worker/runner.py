"""`akm tasks run`: run one task, stream its output, and record the run.

The parent decides and records the outcome (rq's habit): the row is inserted
before the command starts and completed after, so a runner killed with
SIGKILL still leaves a row that the next look marks `abandoned`.

The command runs in its own process group so that a timeout or a stop reaches
its children and grandchildren too. Output is read as it comes, masked, and
sent three ways: the runner's own stdout/stderr, the run's log file, and a
bounded tail kept for state.db. Memory stays flat whatever the command prints.
"""

import fcntl
import json
import os
import select
import signal
import sys
import time

from . import clock, state
from .environment import LineSplitter, Masker, interpolate, secret_values
from .errors import (EXIT_INTERRUPTED, EXIT_INVALID, EXIT_SKIPPED, EXIT_TIMEOUT,
                     AkmError, InvalidTask, MissingVariable, StateError)
from .runlog import RunLogWriter, log_name
from .stash import Stash
from .taskfile import load_task

TAIL_BYTES = 64 * 1024          # per stream, kept in state.db
READ_BYTES = 1 << 16
PIPE_BYTES = 1 << 20            # fewer wake-ups for chatty commands
DRAIN_AFTER_EXIT = 1.0          # seconds to keep reading once the command exits
KILL_GRACE = float(os.environ.get("AKM_KILL_GRACE", "10"))  # SIGTERM -> SIGKILL
USAGE_MAX_BYTES = 8 << 20
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class RunResult:
    def __init__(self, run_id, status, exit_code, error=None):
        self.run_id, self.status, self.exit_code, self.error = run_id, status, exit_code, error

    def __repr__(self):
        return f"RunResult(run_id={self.run_id}, status={self.status!r}, exit_code={self.exit_code})"


def run_task(stash: Stash, task_id: str, trigger: str = "manual", environ=None,
             out_fd: int = 1, err_fd: int = 2, prefix: bytes = b"") -> RunResult:
    """Run TASK_ID once and record it. Returns the outcome; the exit code the
    CLI uses is `result.exit_code`. Raises UnknownTask / StateError when there
    is nothing, or nowhere, to record."""
    environ = os.environ if environ is None else environ
    try:
        return _run(stash, task_id, trigger, environ, out_fd, err_fd, prefix)
    except state.sqlite3.DatabaseError as e:
        # A full volume, a read-only or corrupted state.db after connecting.
        raise StateError.from_sqlite(stash.state_db, e) from None


def _run(stash, task_id, trigger, environ, out_fd, err_fd, prefix) -> RunResult:
    conn = state.connect(stash)
    try:
        task = load_task(stash, task_id)
    except InvalidTask as e:
        return _record_error(stash, conn, task_id, trigger, e)
    state.mark_abandoned(conn, stash)
    lock = TaskLock(stash, task_id)
    if not lock.acquire():
        return _record_skipped(stash, conn, task_id, trigger)
    try:
        try:
            env, interpolated = interpolate(task_id, stash.relative(task.path), task.env, environ)
        except MissingVariable as e:
            return _record_error(stash, conn, task_id, trigger, e)
        return Execution(stash, task, trigger, conn, lock, environ, env, interpolated,
                         out_fd, err_fd, prefix).run()
    finally:
        lock.release()


def _record_error(stash, conn, task_id, trigger, err: AkmError) -> RunResult:
    return _record_final(stash, conn, task_id, trigger, "error", str(err), EXIT_INVALID)


def _record_skipped(stash, conn, task_id, trigger) -> RunResult:
    row = conn.execute("SELECT id, started_at FROM runs WHERE task_id = ? AND status = 'running' "
                       "ORDER BY id DESC LIMIT 1", (task_id,)).fetchone()
    other = f"run {row['id']}, started {row['started_at']}" if row else "another runner"
    msg = f"task {task_id!r} is already running ({other}); this run was skipped"
    return _record_final(stash, conn, task_id, trigger, "skipped", msg, EXIT_SKIPPED)


def _record_final(stash, conn, task_id, trigger, status, error, code) -> RunResult:
    """A run that never started its command: its row, and a two-record log so
    that `akm logs <task> --run N` works for every run."""
    started = time.time()
    now = clock.iso(started)
    path = lambda rid: stash.task_log_dir(task_id) / log_name(started, rid)  # noqa: E731
    run_id = state.start_run(conn, task_id, trigger, status, now, ended_at=now, error=error,
                             log_path_for=lambda rid: stash.relative(path(rid)))
    log = _open_log(path(run_id))
    log.record({"type": "start", "task": task_id, "run_id": run_id, "trigger": trigger,
                "started_at": now, "env": []})
    log.record({"type": "end", "ended_at": now, "status": status, "exit_code": None,
                "signal": None, "duration_s": 0.0, "error": error})
    log.close()
    return RunResult(run_id, status, code, error)


class TaskLock:
    """The per-task overlap lock plus this run's liveness lock (docs/design.md).

    Both are flock()s on files in the stash: the kernel drops them when the
    runner dies, however it dies, so nothing can stay stuck.
    """

    def __init__(self, stash, task_id):
        self.stash, self.task_id = stash, task_id
        self.token = os.urandom(8).hex()
        self.fd = self.live_fd = None
        self.live_path = stash.locks_dir / f"{task_id}.{self.token}.live"

    def acquire(self) -> bool:
        os.makedirs(self.stash.locks_dir, exist_ok=True)
        self.fd = os.open(self.stash.locks_dir / f"{self.task_id}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        # Locked before the row exists, so no checker can see the row unlocked.
        self.live_fd = os.open(self.live_path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.live_fd, fcntl.LOCK_EX)
        return True

    def release(self):
        # LOCK_UN, not just close: the task's processes share these open files
        # (see _spawn), and a daemon it left behind must not keep the task locked.
        if self.live_fd is not None:
            try:
                os.unlink(self.live_path)
            except OSError:
                pass
            fcntl.flock(self.live_fd, fcntl.LOCK_UN)
            os.close(self.live_fd)
            self.live_fd = None
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Execution:
    """One started run: spawn, supervise, record."""

    def __init__(self, stash, task, trigger, conn, lock, environ, env, interpolated,
                 out_fd, err_fd, prefix):
        self.stash, self.task, self.trigger, self.conn = stash, task, trigger, conn
        self.out_fds = {1: out_fd, 2: err_fd}
        self.lock_fds = (lock.fd, lock.live_fd)
        self.prefix = prefix
        self.masker = Masker(secret_values({**environ, **env}, interpolated))
        self.env = {**environ, **env}
        self.env_names = sorted(env)
        self.started = time.time()
        self.run_id = state.start_run(
            conn, task.id, trigger, "running", clock.iso(self.started), runner=lock.token,
            log_path_for=lambda rid: stash.relative(self._log_path(rid)))
        self.usage_path = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                       f"akm-usage-{self.run_id}-{lock.token}.jsonl")
        self.tails = {1: Tail(), 2: Tail()}

    def _log_path(self, run_id):
        return self.stash.task_log_dir(self.task.id) / log_name(self.started, run_id)

    def run(self) -> RunResult:
        outcome = None
        self.log = _open_log(self._log_path(self.run_id))
        try:
            outcome = self._execute()
        except BaseException as e:  # record before anything else happens
            outcome = Outcome("error", None, None, f"internal error: {type(e).__name__}: {e}")
            raise
        finally:
            result = self._finish(outcome)
        return result

    def _start(self, pid):
        self.log.record(self._start_record(pid))
        self.log.flush()

    def _start_record(self, pid):
        return {"type": "start", "task": self.task.id, "run_id": self.run_id,
                "description": self.masker.mask_text(self.task.description),
                "trigger": self.trigger,
                "started_at": clock.iso(self.started),
                "command": self.masker.mask_text(_command_text(self.task.command)),
                "timeout": self.task.timeout, "env": self.env_names, "pid": pid}

    def _execute(self):
        self.env.update(AKM_TASK_ID=self.task.id, AKM_RUN_ID=str(self.run_id),
                        AKM_USAGE_FILE=self.usage_path, AKM_STASH=str(self.stash.root.resolve()))
        os.close(os.open(self.usage_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        try:
            pid, pipes = _spawn(self.task.command, self.env, self.stash.root, self.lock_fds)
        except OSError as e:
            self._start(None)
            return Outcome("error", 127, None, f"cannot start the command: {e.strerror}: "
                           f"{_command_text(self.task.command)[:200]}")
        self._start(pid)  # the command's pid, which is also its process group
        sup = Supervisor(pid, pipes, self.task.timeout, self.masker, self._on_output, self._warn)
        return sup.wait()

    def _on_output(self, fd, block, t, partial=False):
        if not block:
            return
        self.tails[fd].add(block)
        self.log.output(fd, block, t, partial)
        _write_all(self.out_fds[fd], _prefixed(block, self.prefix) if self.prefix else block)

    def _warn(self, message):
        self.log.record({"type": "warning", "t": clock.iso(), "message": message})

    def _finish(self, outcome) -> RunResult:
        usage, tools = read_usage(self.usage_path, self._warn)
        ended = time.time()
        error = outcome.error or self.log.failed
        fields = dict(status=outcome.status, ended_at=clock.iso(ended),
                      exit_code=outcome.exit_code, signal=outcome.signal,
                      stdout=self.tails[1].text(), stderr=self.tails[2].text(),
                      prompt_tokens=usage.get("prompt_tokens"),
                      completion_tokens=usage.get("completion_tokens"),
                      cost_usd=usage.get("cost_usd"), model=usage.get("model"),
                      tools=json.dumps(tools) if tools else None,
                      error=self.masker.mask_text(error) if error else None)
        try:
            state.finish_run(self.conn, self.run_id, **fields)
        finally:
            # The log is not in state.db: it gets its end even when state.db fails.
            self.log.record({"type": "end", "ended_at": fields["ended_at"],
                             "status": outcome.status, "exit_code": outcome.exit_code,
                             "signal": outcome.signal, "duration_s": round(ended - self.started, 3),
                             "usage": _usage_summary(usage), "tools": tools,
                             "error": fields["error"]})
            self.log.close()
        return RunResult(self.run_id, outcome.status, outcome.cli_code(), fields["error"])


class Outcome:
    def __init__(self, status, exit_code, sig, error=None):
        self.status, self.exit_code, self.signal, self.error = status, exit_code, sig, error

    def cli_code(self) -> int:
        if self.status == "timeout":
            return EXIT_TIMEOUT
        if self.status == "interrupted":
            return EXIT_INTERRUPTED
        return self.exit_code if self.exit_code is not None else EXIT_INVALID


class Tail:
    """The last TAIL_BYTES of a stream, and how much came before them."""

    def __init__(self):
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes):
        self.total += len(data)
        self.buf += data
        if len(self.buf) > 2 * TAIL_BYTES:
            del self.buf[:len(self.buf) - TAIL_BYTES]

    def text(self) -> str:
        data = bytes(self.buf[-TAIL_BYTES:])
        if self.total > len(data):
            # Start at a line, not in the middle of one, when there is one near.
            nl = data.find(b"\n", 0, 4096)
            data = data[nl + 1:] if nl != -1 else data
        dropped = self.total - len(data)
        text = data.decode("utf-8", "replace")
        return f"[... {dropped} bytes truncated ...]\n{text}" if dropped else text


# -- process ------------------------------------------------------------------

def _spawn(command, env, cwd, inherit=()):
    """Start COMMAND in a new process group with stdout/stderr piped to us.

    The command inherits the INHERIT fds (the task's locks): if the runner is
    SIGKILLed, its task keeps the locks for as long as any of its processes
    live, so the task is not started again on top of them and its row stays
    `running` until they are gone (then `abandoned`)."""
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    for fd in (r1, r2):
        try:
            fcntl.fcntl(fd, 1031, PIPE_BYTES)  # F_SETPIPE_SZ; best effort
        except OSError:
            pass
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2),
               (os.POSIX_SPAWN_CLOSE, r1), (os.POSIX_SPAWN_CLOSE, r2)]
    # posix_spawn has no cwd: change ours around the spawn (single-threaded).
    here = os.open(".", os.O_RDONLY)
    for fd in inherit:
        os.set_inheritable(fd, True)
    try:
        os.chdir(cwd)
        spawn = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
        # Python ignores SIGPIPE; the command must get the default back, or
        # `yes | head` in a task would never end.
        pid = spawn(argv[0], argv, env, file_actions=actions, setpgroup=0,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, *STOP_SIGNALS))
    except OSError:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        raise
    finally:
        os.fchdir(here)
        os.close(here)
        for fd in inherit:
            os.set_inheritable(fd, False)
    os.close(w1)
    os.close(w2)
    return pid, {r1: 1, r2: 2}


def _kill_group(pgid, sig) -> bool:
    """Signal the whole group; False if nobody is left in it (ESRCH)."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Supervisor:
    """Waits for the command while streaming its output, and enforces the
    timeout and stop signals on its whole process group.

    Signal handlers only set a flag and write to a wake-up pipe; this loop
    acts on them (huey's habit: nothing complicated runs inside a handler).
    """

    def __init__(self, pid, pipes, timeout, masker, on_output, warn):
        self.pid, self.pipes, self.on_output, self.warn = pid, pipes, on_output, warn
        self.masker = masker
        self.splitters = {fd: None for fd in pipes}
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.reason = None          # "timeout" | "interrupted" once we stop it
        self.why = None             # ...and the one line the record gives for it
        self.kill_at = None         # monotonic time for SIGKILL of the group
        self.status = None          # raw wait status once reaped
        self.exited_at = None
        self.signals = []

    def wait(self) -> Outcome:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        old_wake = signal.set_wakeup_fd(wake_w)
        try:
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wake)
            for s, h in old.items():
                signal.signal(s, h)
            for fd in (wake_r, wake_w, *self.pipes):
                os.close(fd)
        return self._outcome()

    def _on_signal(self, signum, frame):
        self.signals.append(signum)

    def _loop(self, wake_r):
        poller = select.poll()
        for fd in (*self.pipes, wake_r):
            poller.register(fd, select.POLLIN)
        pidfd = _pidfd(self.pid)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        try:
            while not self._done():
                for fd, _ in poller.poll(self._poll_ms(pidfd)):
                    if fd == wake_r:
                        os.read(wake_r, 64)
                    elif fd in self.open_pipes():
                        self._read(fd, poller)
                self._reap()
                self._act(time.monotonic())
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def open_pipes(self):
        return [fd for fd, s in self.splitters.items() if s is not False]

    def _read(self, fd, poller):
        data = os.read(fd, READ_BYTES)
        splitter = self.splitters[fd] or self._splitter(fd)
        stream = self.pipes[fd]
        t = time.time()
        if not data:
            self.on_output(stream, splitter.flush() + b"\n" if splitter.rest else b"", t)
            self.splitters[fd] = False
            poller.unregister(fd)
            return
        block, piece = splitter.feed(data)
        self.on_output(stream, block, t)
        self.on_output(stream, piece, t, partial=True)

    def _splitter(self, fd):
        self.splitters[fd] = LineSplitter(self.masker)
        return self.splitters[fd]

    def _poll_ms(self, pidfd):
        if pidfd is None or self.kill_at is not None or self.exited_at is not None:
            return 50
        return max(1, min(1000, int((self.deadline - time.monotonic()) * 1000) + 1))

    def _reap(self):
        if self.status is not None:
            return
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.status, self.exited_at = status, time.monotonic()

    def _act(self, now):
        """Decide what the group gets next: timeout, stop request, leftovers."""
        if self.signals:
            sig, self.signals = self.signals[-1], []
            if self.reason == "interrupted":       # a second request forces
                _kill_group(self.pid, signal.SIGKILL)
            else:
                self._stop("interrupted", now, f"received {signal.Signals(sig).name}")
        if self.reason is None and self.status is None and now >= self.deadline:
            self._stop("timeout", now, f"ran past its timeout of {self.timeout:g}s")
        if self.kill_at is not None and now >= self.kill_at:
            if _kill_group(self.pid, signal.SIGKILL):
                self.warn("the task's processes ignored SIGTERM and were killed (SIGKILL)")
            self.kill_at = float("inf")
        if self.exited_at is not None and self.kill_at is None and now - self.exited_at > DRAIN_AFTER_EXIT:
            # The command is gone but something it started holds the pipes.
            if _kill_group(self.pid, signal.SIGTERM):
                self.warn("processes the task left behind were stopped (SIGTERM)")
                self.kill_at = now + min(KILL_GRACE, 2.0)
            else:
                self.kill_at = float("inf")

    def _stop(self, reason, now, why):
        self.reason, self.why = reason, why
        self.warn(f"{why}: stopping the task's process group (SIGTERM, "
                  f"SIGKILL after {KILL_GRACE:g}s)")
        _kill_group(self.pid, signal.SIGTERM)
        self.kill_at = now + KILL_GRACE

    def _done(self) -> bool:
        if self.status is None:
            return False
        if not self.open_pipes():
            return True
        # Pipes held open by leftovers: give up on them once they are killed.
        return self.kill_at == float("inf") and time.monotonic() - self.exited_at > KILL_GRACE + 1

    def _outcome(self) -> Outcome:
        code = os.waitstatus_to_exitcode(self.status)
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig else code
        if self.reason:
            return Outcome(self.reason, exit_code, sig, self.why)
        return Outcome("success" if exit_code == 0 else "failed", exit_code, sig)


def _pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # old kernel: the loop polls waitpid every 50 ms instead


# -- helpers ------------------------------------------------------------------

def _open_log(path):
    try:
        return RunLogWriter(path)
    except OSError as e:
        return _NoLog(f"log file not written: {e.strerror}: {path}")


class _NoLog:
    def __init__(self, why):
        self.failed = why
        sys.stderr.write(f"akm: {why}\n")

    def record(self, obj):
        pass

    output = flush = close = record


def _command_text(command) -> str:
    return command if isinstance(command, str) else " ".join(command)


def _prefixed(block: bytes, prefix: bytes) -> bytes:
    return b"".join(prefix + line for line in block.splitlines(keepends=True))


def _write_all(fd, data):
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except OSError:
            return  # a closed terminal or log sink must not fail the run
        data = data[n:]


def read_usage(path, warn) -> tuple[dict, dict]:
    """Sum the JSON lines a command appended to AKM_USAGE_FILE. A bad line is a
    warning, never a failed run. The file is removed afterwards."""
    usage, tools = {}, {}
    try:
        with open(path, "rb") as f:
            data = f.read(USAGE_MAX_BYTES)
        os.unlink(path)
    except OSError:
        return usage, tools
    for n, line in enumerate(data.splitlines(), 1):
        if line.strip():
            problem = _add_usage_line(line, usage, tools)
            if problem:
                warn(f"AKM_USAGE_FILE line {n} ignored: {problem}")
    return usage, tools


def _add_usage_line(line, usage, tools):
    try:
        obj = json.loads(line)
    except ValueError:
        return "not a JSON object"
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key in ("prompt_tokens", "completion_tokens"):
        v = obj.get(key)
        if v is not None and (type(v) is not int or v < 0):
            return f"{key} must be a whole number >= 0"
    cost = obj.get("cost_usd")
    if cost is not None and (type(cost) not in (int, float) or cost < 0):
        return "cost_usd must be a number >= 0"
    t = obj.get("tools")
    if t is not None and not (isinstance(t, dict) and all(type(c) is int for c in t.values())):
        return "tools must be an object of tool name -> count"
    for key in ("prompt_tokens", "completion_tokens", "cost_usd"):
        if obj.get(key) is not None:
            usage[key] = usage.get(key, 0) + obj[key]
    if isinstance(obj.get("model"), str):
        usage["model"] = obj["model"]
    for name, count in (t or {}).items():
        tools[str(name)] = tools.get(str(name), 0) + count
    return None


def _usage_summary(usage):
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    total = (p or 0) + (c or 0) if (p is not None or c is not None) else None
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": total,
            "cost_usd": usage.get("cost_usd"), "model": usage.get("model")}


# -- CLI ----------------------------------------------------------------------

def cmd_run(args) -> int:
    stash = Stash.resolve(args.stash)
    if args.detach:
        return _detach(stash, args.task_id, args.trigger)
    result = run_task(stash, args.task_id, args.trigger)
    _report(result, args.task_id)
    return result.exit_code


def _report(result, task_id, prefix=""):
    """One line on stderr for any run that did not succeed (the container log
    shows it for scheduled runs)."""
    if result.status == "success":
        return
    detail = f": {result.error}" if result.error and result.error != result.status else ""
    sys.stderr.write(f"{prefix}akm: {task_id} run {result.run_id}: {result.status} "
                     f"(exit {result.exit_code}){detail}\n")


def _detach(stash, task_id, trigger) -> int:
    """Fork and return at once, so supercronic never waits on a task: its
    reload and shutdown wait for every running job, and one long task would
    freeze all the others' schedules. The child's output goes to
    $AKM_LOG_SINK (the container log), each line prefixed with the task id."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        return 0
    os.setsid()
    sink = os.environ.get("AKM_LOG_SINK") or os.devnull
    try:
        fd = os.open(sink, os.O_WRONLY | os.O_APPEND)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 70
    try:
        prefix = f"[{task_id}] "
        result = run_task(stash, task_id, trigger, prefix=prefix.encode())
        _report(result, task_id, prefix)
        code = result.exit_code
    except AkmError as e:
        sys.stderr.write(f"[{task_id}] akm: {e}\n")
        code = e.exit_code
    finally:
        sys.stderr.flush()
        os._exit(code)
