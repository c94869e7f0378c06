"""Run log files: one JSON Lines file per run, for people and for programs.

`logs/tasks/<id>/<YYYYmmddTHHMMSSZ>-<run id>.log`. Records have a "type":
`start`, `output` (one per line of output, with its stream and time),
`warning`, `end`. The format is documented in README.md ("Run log format").
"""

import json
import os
import sys
import time
from json.encoder import encode_basestring  # the C encoder: one call per line

from . import clock

_STREAMS = {1: "stdout", 2: "stderr"}
# The bytes JSON strings must escape (bar the newlines we split on). A block
# with none of them (most output) becomes records with one str.join in C
# instead of an encoder call per line; translate() finds them at memory speed.
_ESCAPED = bytes([*range(0x0a), *range(0x0b, 0x20), ord('"'), ord("\\")])
_PLAIN = bytes(b for b in range(256) if b not in _ESCAPED)


def log_name(started: float, run_id: int) -> str:
    return f"{clock.compact(started)}-{run_id}.log"


class RunLogWriter:
    """Appends records to a run's log. Never raises after opening: a full disk
    must not kill the task, so a failed write is remembered and reported once
    in the run's record instead (`self.failed`)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "wb", buffering=1 << 16)
        self.failed = None

    def record(self, obj):
        self._write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")

    def output(self, fd: int, block: bytes, t: float, partial=False):
        """One record per line of BLOCK (complete lines, or one piece of a long line)."""
        text = block.decode("utf-8", "replace")
        lines = text.split("\n")
        if not partial:
            lines.pop()  # the empty string after the final newline
        head = f'{{"type":"output","t":"{clock.iso(t)}","stream":"{_STREAMS[fd]}","line":'
        tail = ',"partial":true}\n' if partial else "}\n"
        if block.translate(None, _PLAIN):
            self._write("".join([head + encode_basestring(line) + tail for line in lines]))
        elif lines:
            sep = '"' + tail + head + '"'
            self._write(head + '"' + sep.join(lines) + '"' + tail)

    def flush(self):
        if not self.failed:
            try:
                self.file.flush()
            except OSError as e:
                self._fail(e)

    def close(self):
        try:
            self.file.close()
        except OSError as e:
            self._fail(e)

    def _write(self, text):
        if self.failed:
            return
        try:
            self.file.write(text.encode("utf-8", "surrogateescape"))
        except OSError as e:
            self._fail(e)

    def _fail(self, e):
        if not self.failed:
            self.failed = f"log file incomplete: {e.strerror or e}"
            sys.stderr.write(f"akm: {self.failed}\n")


# -- reading (akm logs) ---------------------------------------------------------

def find_log(stash, task_id, run_id=None):
    """Path of the run's log: the newest one for the task, or run RUN_ID's."""
    from .errors import UsageError
    directory = stash.task_log_dir(task_id)
    names = sorted(os.listdir(directory)) if directory.is_dir() else []
    if run_id is not None:
        names = [n for n in names if n.endswith(f"-{run_id}.log")]
        if not names:
            raise UsageError(f"no log for run {run_id} of task {task_id!r} in {directory} "
                             f"(see `akm runs --task {task_id}`)")
    elif not names:
        raise UsageError(f"task {task_id!r} has no run logs yet in {directory} "
                         f"(run it: `akm tasks run {task_id}`)")
    # Names start with a sortable UTC time, so the last is the newest.
    return directory / names[-1]


def format_record(rec) -> str:
    kind = rec.get("type")
    if kind == "output":
        mark = "|" if rec.get("stream") == "stdout" else "!"
        return f"{rec.get('t', '')[11:23]} {mark} {rec.get('line', '')}"
    if kind == "start":
        env = ", ".join(rec.get("env") or []) or "none"
        return (f"=== run {rec.get('run_id')} of {rec.get('task')} ({rec.get('trigger')}) "
                f"started {rec.get('started_at')}\n    command: {rec.get('command')}\n"
                f"    timeout: {rec.get('timeout')}s   env: {env}")
    if kind == "end":
        return _format_end(rec)
    if kind == "warning":
        return f"{rec.get('t', '')[11:23]} warning: {rec.get('message')}"
    return json.dumps(rec)


def _format_end(rec) -> str:
    usage = rec.get("usage") or {}
    line = (f"=== {rec.get('status')} exit={rec.get('exit_code')} "
            f"in {rec.get('duration_s')}s, ended {rec.get('ended_at')}")
    if usage.get("total_tokens") or usage.get("cost_usd"):
        line += (f"\n    tokens: {usage.get('prompt_tokens', 0)} prompt + "
                 f"{usage.get('completion_tokens', 0)} completion, "
                 f"cost ${usage.get('cost_usd') or 0:.4f} {usage.get('model') or ''}")
    if rec.get("tools"):
        line += "\n    tools: " + ", ".join(f"{k}={v}" for k, v in rec["tools"].items())
    if rec.get("error"):
        line += f"\n    error: {rec['error']}"
    return line


def print_log(path, out, raw=False, follow=False, still_running=None):
    """Print a log file; with FOLLOW, keep going until its end record (or until
    STILL_RUNNING() says the run is over, for a runner that died)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        pending = ""
        while True:
            chunk = f.read()
            pending += chunk
            *lines, pending = pending.split("\n")
            ended = False
            for line in lines:
                ended = _print_line(line, out, raw) or ended
            out.flush()
            if not follow or ended:
                return
            if not chunk:
                if still_running is not None and not still_running():
                    return
                time.sleep(0.25)


def _print_line(line, out, raw) -> bool:
    if not line:
        return False
    try:
        rec = json.loads(line)
    except ValueError:
        out.write(line + "\n")
        return False
    out.write((line if raw else format_record(rec)) + "\n")
    return rec.get("type") == "end"


def cmd_logs(args) -> int:
    from .stash import Stash
    stash = Stash.resolve(args.stash)
    path = find_log(stash, args.task_id, args.run)
    still_running = None
    if args.follow:
        still_running = lambda: _is_running(stash, path)  # noqa: E731
    print_log(path, sys.stdout, raw=args.raw, follow=args.follow, still_running=still_running)
    return 0


def _is_running(stash, path) -> bool:
    from . import state
    run_id = int(path.stem.rsplit("-", 1)[1])
    conn = state.connect(stash)
    state.mark_abandoned(conn, stash)
    row = state.get_run(conn, run_id)
    return bool(row) and row["status"] == "running"
