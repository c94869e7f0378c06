"""The crontab supercronic reads: one line per enabled, valid task.

Each line is `<schedule> akm tasks run <id> --trigger schedule --detach`
(design.md "The image": --detach so supercronic never waits on a task).

`schedule.check` already applies supercronic's rules; where supercronic is on
PATH, `check_lines` confirms with `supercronic -test` anyway, so a line it
would reject (and with it the whole file: supercronic refuses a crontab with
one bad line) never reaches the file. The common case costs one call for the
whole file; only a failure bisects down to the bad lines.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import StateError
from .stash import Stash
from .taskfile import load_all

HEADER = ("# Written by `akm tasks install` from the task files in {tasks}.\n"
          "# Edits here are overwritten: change the task files instead.\n")
_TEST_TIMEOUT = 30


def line_for(task) -> str:
    return f"{task.schedule} akm tasks run {task.id} --trigger schedule --detach"


def render(tasks) -> str:
    """Crontab text (no header) for the enabled tasks, in the order given."""
    return "".join(line_for(t) + "\n" for t in tasks if t.enabled)


def default_path() -> Path:
    return Path(os.environ.get("AKM_CRONTAB") or Path.home() / ".akm" / "crontab")


def check_lines(lines: list[str], supercronic: str | None = None) -> tuple[list[str], list[str]]:
    """(lines supercronic accepts, one problem per rejected line).

    Without supercronic on PATH (or if it cannot run) every line is kept:
    schedule.check has already applied its rules.
    """
    exe = supercronic or shutil.which("supercronic")
    if not exe or not lines:
        return list(lines), []
    try:
        if _accepts(exe, lines):
            return list(lines), []
        good, bad = _bisect(exe, lines)
    except (OSError, subprocess.SubprocessError):
        return list(lines), []
    return good, [f"supercronic rejects crontab line `{line}` (the task is not scheduled)"
                  for line in bad]


def _bisect(exe, lines):
    """Split until each rejected line stands alone: O(bad * log n) calls."""
    if len(lines) == 1:
        return ([], lines) if not _accepts(exe, lines) else (lines, [])
    mid = len(lines) // 2
    good, bad = [], []
    for half in (lines[:mid], lines[mid:]):
        if _accepts(exe, half):
            good += half
        else:
            g, b = _bisect(exe, half)
            good += g
            bad += b
    return good, bad


def _accepts(exe: str, lines: list[str]) -> bool:
    with tempfile.NamedTemporaryFile("w", prefix="akm-crontab-", suffix=".test") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        done = subprocess.run([exe, "-test", f.name], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=_TEST_TIMEOUT)
    return done.returncode == 0


def build(stash: Stash) -> tuple[str, int, list[str]]:
    """(crontab text with header, number of job lines, problems): nothing written."""
    tasks, errors = load_all(stash)
    problems = [str(e) for e in errors]
    lines, rejected = check_lines(render(tasks).splitlines())
    problems += rejected
    text = HEADER.format(tasks=stash.tasks_dir) + "".join(line + "\n" for line in lines)
    return text, len(lines), problems


def install(stash: Stash, path=None) -> tuple[Path, bool, list[str]]:
    """Write the crontab atomically; (path, changed, problems).

    StateError if it cannot be written.
    """
    path = Path(path) if path else default_path()
    text, _, problems = build(stash)
    return path, write_if_changed(path, text), problems


def write_if_changed(path: Path, text: str) -> bool:
    """Write unless the file already holds `text`; True if written.

    An unchanged file is left alone, so its mtime means "the schedule last
    changed" and a watcher sees no event.
    """
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic(path, text)
    return True


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory + fsync + rename: readers (supercronic
    reloading) see the old file or the new one, never half of one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise StateError(f"cannot write the crontab {path}: {e.strerror or e} "
                         f"(pass --crontab PATH or set AKM_CRONTAB to a writable place)") from None
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cmd_install(args) -> int:
    stash = Stash.resolve(args.stash)
    text, count, problems = build(stash)
    if getattr(args, "print_only", False):
        sys.stdout.write(text)
    else:
        path = Path(args.crontab) if getattr(args, "crontab", None) else default_path()
        state = "wrote" if write_if_changed(path, text) else "unchanged:"
        print(f"{state} {path} ({count} task{'' if count == 1 else 's'} scheduled)")
    for problem in problems:
        sys.stderr.write(f"{problem}\n")
    if problems:
        sys.stderr.write(f"akm: {len(problems)} task file(s) not scheduled "
                         f"(`akm tasks validate` checks them)\n")
        return 1
    return 0
