"""One small exception hierarchy and the exit codes it maps to.

Core modules raise these; the CLI catches AkmError, prints its one-line
message to stderr and exits with its code. Anything else is a bug and shows a
traceback only when AKM_DEBUG=1.
"""

# Exit codes of `akm` (documented in README.md, "Exit codes"). `akm tasks run`
# also passes the command's own exit status through, so these sit where shell
# commands rarely land (sysexits.h and the 124/130 conventions of timeout(1)
# and shells).
EXIT_OK = 0
EXIT_PROBLEMS = 1       # health: problems found; tasks validate: a file is invalid
EXIT_USAGE = 64         # bad arguments, unknown task id
EXIT_INVALID = 65       # invalid task file or missing variable (run recorded as `error`)
EXIT_NO_STASH = 66      # the stash directory does not exist
EXIT_INTERNAL = 70      # a bug: please report it
EXIT_STATE = 74         # state.db (or the stash) cannot be read or written
EXIT_SKIPPED = 75       # the task is already running (run recorded as `skipped`)
EXIT_TIMEOUT = 124      # the command ran past its timeout and was killed
EXIT_INTERRUPTED = 130  # the runner was told to stop (SIGTERM/SIGINT) mid-run


class AkmError(Exception):
    """An error a user can act on: one line, no traceback."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(AkmError):
    exit_code = EXIT_USAGE


class UnknownTask(UsageError):
    def __init__(self, task_id: str, tasks_dir):
        super().__init__(
            f"unknown task {task_id!r}: no {tasks_dir}/{task_id}.yml "
            f"(see `akm tasks list`)")
        self.task_id = task_id


class InvalidTask(AkmError):
    """A task file that does not load. `str()` is the one line users see."""

    exit_code = EXIT_INVALID

    def __init__(self, path, field: str | None, problem: str, fix: str = ""):
        where = f"{path}: " + (f"field `{field}`: " if field else "")
        tail = f" ({fix})" if fix else ""
        super().__init__(f"{where}{problem}{tail}")
        self.path = str(path)
        self.field = field
        self.problem = problem
        self.fix = fix


class MissingVariable(AkmError):
    exit_code = EXIT_INVALID


class NoStash(AkmError):
    exit_code = EXIT_NO_STASH


class StateError(AkmError):
    exit_code = EXIT_STATE

    @classmethod
    def from_sqlite(cls, path, e) -> "StateError":
        """One line with the fix for an SQLite error on PATH (state.db)."""
        text = str(e)
        if "not a database" in text or "malformed" in text:
            fix = "move state.db, state.db-wal and state.db-shm aside; akm starts a new one"
            return cls(f"{path} is corrupted ({text}): {fix} (README: Troubleshooting)")
        if "full" in text:
            return cls(f"cannot write {path}: the stash volume is full ({text}); free space "
                       f"there, or delete old runs: akm prune --older-than 30d")
        if "readonly" in text or "unable to open" in text or "permission" in text.lower():
            return cls(f"cannot write {path} ({text}): make the stash and state.db writable "
                       f"by the worker's user (PUID/PGID)")
        return cls(f"{path}: {text}")
