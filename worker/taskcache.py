"""Parsed task files, cached by file identity, so a scheduled run skips YAML.

`akm tasks run` starts a process per run, and importing yaml and validating
the file cost more than everything else it does before the command starts.
A task file that has not changed since it was last loaded (same device,
inode, size, mtime and ctime, same akm-worker version) is read back from
`.akm/cache/tasks/<id>.json` instead. Only valid tasks are cached; any doubt
(a missing, unreadable or stale entry) means parsing the file again.
"""

import json
import os
import time

from . import __version__

RACY_SECONDS = 2.0
_FIELDS = ("schedule", "command", "enabled", "timeout", "env", "description",
           "token_budget", "grace", "name", "tags", "when_to_use", "version")


def file_key(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, __version__]


def _entry(stash, task_id):
    return stash.root / ".akm" / "cache" / "tasks" / f"{task_id}.json"


def get(stash, task_id, path, key, task_class):
    if key is None:
        return None
    try:
        with open(_entry(stash, task_id), encoding="utf-8") as f:
            entry = json.load(f)
        if entry["key"] != key or entry["path"] != str(path):
            return None
        fields = entry["task"]
        fields["tags"] = tuple(fields["tags"])
        return task_class(id=task_id, path=path, **fields)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def put(stash, task, key):
    """Best effort: a read-only stash or a full disk only costs speed."""
    # File times tick coarsely (a few ms): a file written this recently could
    # change again within the same tick, unseen. Like git's "racy" entries,
    # such a file is simply parsed again next time.
    if key is None or time.time() - key[3] / 1e9 < RACY_SECONDS:
        return
    entry = _entry(stash, task.id)
    try:
        data = {"key": key, "path": str(task.path),
                "task": {f: getattr(task, f) for f in _FIELDS}}
        os.makedirs(entry.parent, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, entry)
    except (OSError, TypeError, ValueError):
        pass
