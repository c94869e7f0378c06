"""Where things live in a stash. Every path the worker touches comes from here."""

import os
from pathlib import Path

from .errors import NoStash

DEFAULT_STASH = "/stash"


class Stash:
    """A stash directory: tasks/, state.db, logs/ and the worker's lock files.

    Paths stored in state.db (log_path) are relative to the stash root, so the
    same database reads the same from the host and from inside a container
    that mounts the stash elsewhere.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.state_db = self.root / "state.db"
        self.logs_dir = self.root / "logs" / "tasks"
        # Locks live on the shared volume so the sidecar (another container,
        # another pid namespace) can tell a live runner from a dead one.
        self.locks_dir = self.root / ".akm" / "locks"

    @classmethod
    def resolve(cls, arg: str | None = None, must_exist: bool = True) -> "Stash":
        root = arg or os.environ.get("AKM_STASH") or DEFAULT_STASH
        stash = cls(root)
        if must_exist and not stash.root.is_dir():
            what = "is not a directory" if stash.root.exists() else "does not exist"
            raise NoStash(f"stash directory {root} {what} (set AKM_STASH or pass --stash DIR)")
        return stash

    def task_log_dir(self, task_id: str) -> Path:
        return self.logs_dir / task_id

    def relative(self, path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def absolute(self, stored: str) -> Path:
        p = Path(stored)
        return p if p.is_absolute() else self.root / p
