"""Task files: `$AKM_STASH/tasks/<id>.yml` loaded and validated into `Task`.

`load_task` is on the hot path (each scheduled run loads its own file), so it
reads only that one file, through the cache in taskcache.py; yaml is imported
only when a file really has to be parsed. `load_all` never raises for one bad file: it returns the good
tasks and one `InvalidTask` per bad file, so one typo never hides the rest.

Decisions a user can see (README "Task files"):
- `env` values: strings; YAML numbers are taken as their text (`PORT: 8080`
  gives "8080"). Booleans and nulls are refused with "quote it", because
  YAML 1.1 reads `yes`, `no`, `on`, `off` as booleans and we cannot know which
  spelling was meant.
- Files whose names start with `.` are ignored (editors' temporary files);
  other `.yml`/`.yaml` names must be valid ids.
"""

import re
import stat
from pathlib import Path

from . import schedule as _schedule
from . import taskcache
from .errors import InvalidTask, UnknownTask


ID_RE = re.compile(r"[a-z0-9_-]+")
EXTENSIONS = (".yml", ".yaml")
DEFAULT_TIMEOUT = 300.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A `${` that does not open ${NAME} or ${NAME:-default} (after removing $$).
_BAD_REF = re.compile(r"\$\{(?![A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})")

# akm's own targets; this worker runs only `command`.
_AKM_TARGETS = ("prompt", "workflow")
FIELDS = ("schedule", "command", "enabled", "timeout", "timeoutMs", "env", "description",
          "token_budget", "grace", "name", "tags", "when_to_use", "version")


class Task:
    """One valid task file. A plain class, not a dataclass: importing
    dataclasses costs ~5 ms on every `akm tasks run`."""

    __slots__ = ("id", "path", "schedule", "command", "enabled", "timeout", "env",
                 "description", "token_budget", "grace", "name", "tags", "when_to_use",
                 "version")

    def __init__(self, id: str, path: Path, schedule: str, command, enabled: bool = True,
                 timeout: float = DEFAULT_TIMEOUT, env: dict | None = None,
                 description: str = "", token_budget: int | None = None,
                 grace: int | None = None, name: str | None = None, tags: tuple = (),
                 when_to_use: str | None = None, version: str | None = None):
        self.id = id                    # the file name without .yml/.yaml
        self.path = path
        self.schedule = schedule        # normalised: stripped, single spaces
        self.command = command          # str -> /bin/sh -c; list -> exec directly
        self.enabled = enabled
        self.timeout = timeout          # seconds (timeoutMs / 1000 for akm files)
        self.env = env or {}            # raw values, NOT interpolated
        self.description = description
        self.token_budget = token_budget
        self.grace = grace              # seconds; health's `late` grace override
        self.name = name
        self.tags = tags
        self.when_to_use = when_to_use
        self.version = version

    def _values(self):
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other):
        return type(other) is Task and self._values() == other._values()

    def __hash__(self):
        return hash((self.id, str(self.path)))

    def __repr__(self):
        return f"Task(id={self.id!r}, schedule={self.schedule!r}, path={str(self.path)!r})"


def load_task(stash, task_id: str) -> Task:
    """The task `task_id`; UnknownTask if no file, InvalidTask if it is bad."""
    if not ID_RE.fullmatch(task_id or ""):
        # `akm tasks run Report` with tasks/Report.yml present: say what is
        # wrong with the file rather than "unknown". Plain names only, so an
        # id like ../x never makes us look outside tasks/.
        plain = task_id and "/" not in task_id and "\0" not in task_id and task_id[0] != "."
        for ext in EXTENSIONS if plain else ():
            if (stash.tasks_dir / f"{task_id}{ext}").exists():
                raise _bad_name(stash.tasks_dir / f"{task_id}{ext}")
        raise UnknownTask(task_id, stash.tasks_dir)
    paths = [p for p in (stash.tasks_dir / f"{task_id}{ext}" for ext in EXTENSIONS)
             if p.exists() or p.is_symlink()]
    if not paths:
        raise UnknownTask(task_id, stash.tasks_dir)
    if len(paths) > 1:
        raise _duplicate(paths)
    # The key is taken before parsing, so an edit made meanwhile is never
    # cached under the new file's identity.
    key = taskcache.file_key(paths[0])
    task = taskcache.get(stash, task_id, paths[0], key, Task)
    if task is None:
        task = parse_file(paths[0], task_id)
        taskcache.put(stash, task, key)
    return task


def load_all(stash) -> tuple[list[Task], list[InvalidTask]]:
    """Every task file in tasks/: (valid tasks sorted by id, errors sorted by path)."""
    tasks, errors = [], []
    for task_id, paths in sorted(task_files(stash).items()):
        try:
            if task_id is None or not ID_RE.fullmatch(task_id):
                raise _bad_name(paths[0])
            if len(paths) > 1:
                raise _duplicate(paths)
            tasks.append(parse_file(paths[0], task_id))
        except InvalidTask as e:
            errors.append(e)
    errors.sort(key=lambda e: e.path)
    return tasks, errors


def task_files(stash) -> dict:
    """{id: [paths]} for every .yml/.yaml file in tasks/ (none if it is missing).

    A file whose stem is not a valid id is keyed by its file name so it is
    still reported (as invalid) instead of silently skipped.
    """
    found: dict = {}
    try:
        entries = list(stash.tasks_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for path in entries:
        if path.name.startswith(".") or path.suffix not in EXTENSIONS:
            continue
        key = path.stem if ID_RE.fullmatch(path.stem) else path.name
        found.setdefault(key, []).append(path)
    for paths in found.values():
        paths.sort()
    return found


def parse_file(path: Path, task_id: str) -> Task:
    """Read, parse and validate one file; InvalidTask (one line) for any problem."""
    if not ID_RE.fullmatch(task_id):
        raise _bad_name(path)
    try:
        # A FIFO named like a task would block read_bytes() forever.
        if not stat.S_ISREG(path.stat().st_mode):
            raise InvalidTask(path, None, "is not a regular file", "replace it with a YAML file")
        data = path.read_bytes()
    except OSError as e:
        raise InvalidTask(path, None, f"cannot read it: {e.strerror or e}",
                          "check that it is a readable file") from None
    return from_mapping(path, task_id, _parse_yaml(path, data))


def _parse_yaml(path: Path, data: bytes):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidTask(path, None, f"not UTF-8 text (bad byte at offset {e.start})",
                          "save it as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    import yaml  # here, not at the top: a cached task never needs it
    try:
        # The C loader is several times faster; 1,000 files load well under 1 s.
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = (e.problem or e.context or "bad syntax").replace("\n", " ")
        raise InvalidTask(path, None, f"YAML syntax error{where}: {what}",
                          "fix the YAML there") from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidTask(path, None, f"YAML error: {first}", "fix the YAML") from None
    if doc is None:
        raise InvalidTask(path, None, "the file is empty",
                          "write at least `schedule:` and `command:`")
    if not isinstance(doc, dict):
        raise InvalidTask(path, None, f"the file holds {_kind(doc)}, not a mapping",
                          "write `key: value` lines such as `schedule:` and `command:`")
    return doc


def from_mapping(path: Path, task_id: str, doc: dict) -> Task:
    """Validate a parsed mapping; every error names the field and the fix."""
    _check_keys(path, doc)
    for key in ("schedule", "command"):
        if key not in doc:
            raise InvalidTask(path, key, "is missing", _REQUIRED_FIX[key])
    return Task(
        id=task_id, path=path,
        schedule=_get_schedule(path, doc["schedule"]),
        command=_get_command(path, doc["command"]),
        enabled=_get(path, doc, "enabled", bool, True),
        timeout=_get_timeout(path, doc),
        env=_get_env(path, doc.get("env")),
        description=_get(path, doc, "description", str, "") or "",
        token_budget=_get_int(path, doc, "token_budget", 1),
        grace=_get_int(path, doc, "grace", 0),
        name=_get(path, doc, "name", str, None),
        tags=_get_tags(path, doc.get("tags")),
        when_to_use=_get(path, doc, "when_to_use", str, None),
        version=_get_version(path, doc.get("version")),
    )


_REQUIRED_FIX = {
    "schedule": "add e.g. `schedule: \"*/15 * * * *\"`",
    "command": "add e.g. `command: ./run.sh` (a string runs with /bin/sh -c)",
}


def _check_keys(path, doc):
    for target in _AKM_TARGETS:
        if target in doc:
            raise InvalidTask(path, target, f"akm `{target}` tasks are not run by this worker",
                              "it runs only `command` tasks: give a `command:` "
                              f"and remove `{target}:`")
    for key in doc:
        if key in FIELDS:
            continue
        import difflib  # only when a key is wrong: keep it off the hot path
        shown = _shown(key)
        close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.6) or \
            difflib.get_close_matches(str(key).lower(), [f.lower() for f in FIELDS], n=1)
        if close:
            match = next(f for f in FIELDS if f.lower() == close[0].lower())
            fix = f"did you mean `{match}`?"
        else:
            fix = "remove it; known fields: " + ", ".join(FIELDS)
        raise InvalidTask(path, shown, "unknown field", fix)
    if "timeout" in doc and "timeoutMs" in doc:
        raise InvalidTask(path, "timeoutMs", "both `timeout` and `timeoutMs` are given",
                          "keep one: `timeout` in seconds or `timeoutMs` in milliseconds")


def _get(path, doc, key, typ, default):
    value = doc.get(key, default)
    if value is None and default is None:
        return None
    # bool is an int in Python, so check it exactly: `timeout: true` is wrong.
    if type(value) is not typ:
        want = {bool: "true or false", str: "a string"}[typ]
        raise InvalidTask(path, key, f"must be {want}, not {_kind(value)}",
                          f"write e.g. `{key}: {_EXAMPLES[key]}`")
    return value


_EXAMPLES = {"enabled": "false", "description": '"Nightly report"', "name": "nightly-report",
             "when_to_use": '"every night"', "token_budget": "50000", "grace": "600",
             "timeout": "300", "timeoutMs": "300000"}


def _get_int(path, doc, key, minimum):
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        what = f"{value}" if type(value) is int else _kind(value)
        bound = "greater than 0" if minimum == 1 else f"at least {minimum}"
        raise InvalidTask(path, key, f"must be a whole number {bound}, not {what}",
                          f"write e.g. `{key}: {_EXAMPLES[key]}`")
    return value


def _get_timeout(path, doc) -> float:
    if "timeoutMs" in doc:
        return _get_int(path, doc, "timeoutMs", 1) / 1000.0
    if doc.get("timeout") is None:
        if "timeout" in doc:
            raise InvalidTask(path, "timeout", "is empty", "write seconds, e.g. `timeout: 300`")
        return DEFAULT_TIMEOUT
    return float(_get_int(path, doc, "timeout", 1))


def _get_schedule(path, value) -> str:
    if not isinstance(value, str):
        raise InvalidTask(path, "schedule", f"must be a string, not {_kind(value)}",
                          'quote it, e.g. `schedule: "*/15 * * * *"`')
    problem = _schedule.check(value)
    if problem:
        # Structural problems get the general fix; a field's problem already says it.
        general = problem.startswith(("is ", "has ", "contains", "unknown"))
        raise InvalidTask(path, "schedule", f"`{_shown(value.strip())}`{' ' if general else ': '}{problem}",
                          _schedule.FIX if general else "")
    return _schedule.normalise(value)


def _get_command(path, value):
    fix = "write a shell command (`command: ./run.sh --all`) or a list (`command: [./run.sh, --all]`)"
    if isinstance(value, str):
        if not value.strip():
            raise InvalidTask(path, "command", "is empty", fix)
        return value
    if isinstance(value, list):
        if not value:
            raise InvalidTask(path, "command", "is an empty list", fix)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidTask(path, "command", f"item {i + 1} is {_kind(item)}, not a string",
                                  "quote it, e.g. `- \"8080\"`")
        if not value[0].strip():
            raise InvalidTask(path, "command", "the program (first item) is empty", fix)
        return list(value)
    if isinstance(value, (bool, int, float)):
        # YAML reads `command: true` as a boolean, `command: 1` as a number.
        fix = f'quote it: `command: "{str(value).lower() if isinstance(value, bool) else value}"`'
    raise InvalidTask(path, "command", f"must be a string or a list of strings, not {_kind(value)}",
                      fix)


def _get_env(path, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidTask(path, "env", f"must be a mapping, not {_kind(value)}",
                          "write `NAME: value` lines indented under `env:`")
    env = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise InvalidTask(path, "env", f"`{_shown(name)}` is not a valid variable name",
                              "use letters, digits and _, not starting with a digit")
        if isinstance(raw, bool) or raw is None or not isinstance(raw, (str, int, float)):
            raise InvalidTask(path, "env", f"`{name}` is {_kind(raw)}, not a string",
                              f'quote the value, e.g. `{name}: "true"`')
        env[name] = raw if isinstance(raw, str) else str(raw)
        if _BAD_REF.search(env[name].replace("$$", "")):
            raise InvalidTask(path, "env", f"`{name}` has a malformed `${{...}}`",
                              "write ${NAME} or ${NAME:-default}, and $$ for a literal $")
    return env


def _get_tags(path, value) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidTask(path, "tags", "must be a list of strings",
                          "write e.g. `tags: [reports, nightly]`")
    return tuple(value)


def _get_version(path, value):
    if value is None:
        return None
    # akm writes "1.0.0"; a bare `version: 1` or `1.2` is plain YAML for the same.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidTask(path, "version", f"must be a string, not {_kind(value)}",
                          'write e.g. `version: "1.0.0"`')
    return str(value)


def _shown(value, limit: int = 60) -> str:
    """User text fit for a one-line message: control characters escaped, cut short."""
    text = value if isinstance(value, str) else repr(value)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def _shown_path(path) -> str:
    # A file name with a newline in it must not break "one line per file".
    return str(Path(path).parent / _shown(Path(path).name, limit=200))


def _kind(value) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "a mapping", type(None): "empty"}
    return names.get(type(value), f"a {type(value).__name__}")


def _bad_name(path) -> InvalidTask:
    return InvalidTask(_shown_path(path), None,
                       f"`{_shown(Path(path).name)}` is not a valid task file name",
                       "rename it to lowercase letters, digits, - and _, ending .yml")


def _duplicate(paths) -> InvalidTask:
    paths = sorted(paths)
    names = " and ".join(p.name for p in paths)
    return InvalidTask(paths[0], None, f"two files for one task: {names}",
                       "keep one of them")


# --- `akm tasks list` / `akm tasks validate` ---------------------------------

LIST_COLUMNS = [("id", "id"), ("enabled", "enabled"), ("schedule", "schedule"),
                ("next_run", "next run"), ("last_status", "last status"),
                ("last_run", "last run")]


def list_rows(stash, now) -> list[dict]:
    """One row per task file (valid or not), sorted by id; `now` is aware."""
    from . import schedule
    tasks, errors = load_all(stash)
    last = last_runs(stash)
    tz = schedule.zone()
    rows = []
    for t in tasks:
        nxt = schedule.next_fire(t.schedule, now, tz) if t.enabled else None
        status, started = last.get(t.id, (None, None))
        rows.append({"id": t.id, "enabled": t.enabled, "schedule": t.schedule,
                     "next_run": _iso(nxt), "last_status": status, "last_run": started,
                     "path": str(t.path)})
    for e in errors:
        task_id = Path(e.path).stem
        status, started = last.get(task_id, (None, None))
        rows.append({"id": task_id, "enabled": None, "schedule": None, "next_run": None,
                     "last_status": "invalid", "last_run": started, "path": e.path,
                     "error": str(e)})
    rows.sort(key=lambda r: (r["id"], r["path"]))
    return rows


def last_runs(stash) -> dict:
    """{task_id: (status, started_at)} of each task's newest run; {} without state.db.

    Read-only URI: listing must never create state.db or take a write lock.
    """
    import sqlite3
    from urllib.parse import quote
    if not stash.state_db.is_file():
        return {}
    try:
        conn = sqlite3.connect(f"file:{quote(str(stash.state_db))}?mode=ro", uri=True, timeout=5)
        try:
            # SQLite fills bare columns from the row that holds the MAX().
            rows = conn.execute("SELECT task_id, status, started_at, MAX(id) "
                                "FROM runs GROUP BY task_id").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    return {r[0]: (r[1], r[2]) for r in rows}


def _iso(dt) -> str | None:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


def cmd_list(args) -> int:
    import sys
    from datetime import datetime, timezone
    from .output import emit
    from .stash import Stash
    stash = Stash.resolve(args.stash)
    rows = list_rows(stash, datetime.now(timezone.utc))
    if not rows and args.format == "text":
        sys.stderr.write(f"akm: no task files in {stash.tasks_dir} (add tasks/<id>.yml)\n")
    emit(rows, LIST_COLUMNS, args.format)
    return 0


def cmd_validate(args) -> int:
    import sys
    from .errors import EXIT_OK, EXIT_PROBLEMS
    from .output import emit
    from .stash import Stash
    stash = Stash.resolve(args.stash)
    tasks, errors = load_all(stash)
    if args.format == "json":
        rows = [{"id": t.id, "path": str(t.path), "valid": True} for t in tasks]
        rows += [{"id": Path(e.path).stem, "path": e.path, "valid": False, "field": e.field,
                  "problem": e.problem, "fix": e.fix, "message": str(e)} for e in errors]
        emit(sorted(rows, key=lambda r: r["path"]), [], "json")
    else:
        for e in errors:
            sys.stderr.write(f"{e}\n")
        if not tasks and not errors:
            print(f"no task files in {stash.tasks_dir} (nothing to check; add tasks/<id>.yml)")
        else:
            print(f"{len(tasks)} valid, {len(errors)} invalid")
    return EXIT_PROBLEMS if errors else EXIT_OK
