"""taskfile.py: loading and validating task files, `akm tasks list` and
`akm tasks validate`, against real files in a temporary stash."""

import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import run_akm, write_task
from worker.errors import InvalidTask, UnknownTask
from worker.stash import Stash
from worker.taskfile import FIELDS, Task, load_all, load_task

GOOD = """
    schedule: "*/5 * * * *"
    command: echo hi
"""


def load(stash, task_id="t"):
    return load_task(Stash(stash), task_id)


def invalid(stash, text, task_id="t", ext="yml") -> InvalidTask:
    write_task(stash, task_id, text, ext)
    with pytest.raises(InvalidTask) as e:
        load(stash, task_id)
    return e.value


# --- loading ------------------------------------------------------------------

def test_minimal_file_gets_the_defaults(stash):
    path = write_task(stash, "t", GOOD)
    assert load(stash) == Task(id="t", path=path, schedule="*/5 * * * *", command="echo hi")
    t = load(stash)
    assert (t.enabled, t.timeout, t.env, t.description, t.token_budget, t.grace) == \
        (True, 300.0, {}, "", None, None)


def test_every_field_is_read(stash):
    write_task(stash, "t", """
        schedule: "  0   9 * *  mon-fri "
        command: ./report.sh
        enabled: false
        timeout: 60
        env: {REPORT_DIR: /tmp/r, PORT: 8080, RATIO: 0.5}
        description: Nightly report
        token_budget: 50000
        grace: 0
        name: report
        tags: [reports, nightly]
        when_to_use: every weekday
        version: "1.0.0"
    """)
    t = load(stash)
    assert t.schedule == "0 9 * * mon-fri"
    assert (t.enabled, t.timeout, t.token_budget, t.grace) == (False, 60.0, 50000, 0)
    assert t.env == {"REPORT_DIR": "/tmp/r", "PORT": "8080", "RATIO": "0.5"}
    assert (t.description, t.name, t.tags, t.when_to_use, t.version) == \
        ("Nightly report", "report", ("reports", "nightly"), "every weekday", "1.0.0")


def test_akm_file_with_timeout_ms_and_a_command_list(stash):
    write_task(stash, "t", """
        schedule: "@daily"
        command: [python, -c, "print(1)"]
        timeoutMs: 1500
        version: 2
    """)
    t = load(stash)
    assert t.command == ["python", "-c", "print(1)"] and t.timeout == 1.5 and t.version == "2"


def test_yaml_extension_loads_too(stash):
    write_task(stash, "t", GOOD, ext="yaml")
    assert load(stash).path.name == "t.yaml"


def test_utf8_bom_is_accepted(stash):
    (stash / "tasks" / "t.yml").write_bytes(b"\xef\xbb\xbfschedule: '@hourly'\ncommand: x\n")
    assert load(stash).schedule == "@hourly"


def test_unknown_id_is_a_usage_error(stash):
    with pytest.raises(UnknownTask):
        load(stash, "nope")
    with pytest.raises(UnknownTask):
        load(stash, "../etc/passwd")


def test_running_a_file_with_a_bad_name_says_what_is_wrong(stash):
    write_task(stash, "Report", GOOD)
    with pytest.raises(InvalidTask) as e:
        load(stash, "Report")
    assert "`Report.yml` is not a valid task file name" in str(e.value)


def test_block_scalar_schedule_with_a_trailing_newline_is_fine(stash):
    write_task(stash, "t", "schedule: |\n  */5 * * * *\ncommand: x\n")
    assert load(stash).schedule == "*/5 * * * *"


def test_schedule_spanning_two_lines_is_invalid(stash):
    e = invalid(stash, "schedule: \"*/5 * *\\n* *\"\ncommand: x\n")
    assert "contains characters cron does not use" in str(e) and "\n" not in str(e)


# --- one line naming the file, the field and the fix ---------------------------

@pytest.mark.parametrize("text,message", [
    ("schedule: '@daily'\ncommand: x\ntimeot: 5\n",
     "field `timeot`: unknown field (did you mean `timeout`?)"),
    ("schedule: '@daily'\ncommand: x\nTimeout: 5\n", "(did you mean `timeout`?)"),
    ("schedule: '@daily'\ncommand: x\nfoo: 5\n", "field `foo`: unknown field (remove it; known fields:"),
    ("schedule: '@daily'\ncommand: x\ntimeout: true\n",
     "field `timeout`: must be a whole number greater than 0, not a boolean (write e.g. `timeout: 300`)"),
    ("schedule: '@daily'\ncommand: x\ntimeout: 0\n", "field `timeout`: must be a whole number greater than 0, not 0"),
    ("schedule: '@daily'\ncommand: x\ntimeout: 1.5\n", "field `timeout`: must be a whole number"),
    ("schedule: '@daily'\ncommand: x\ntimeout: 5m\n", "field `timeout`: must be a whole number greater than 0, not a string"),
    ("schedule: '@daily'\ncommand: x\ntimeout:\n", "field `timeout`: is empty"),
    ("schedule: '@daily'\ncommand: x\ntimeout: 5\ntimeoutMs: 5000\n",
     "field `timeoutMs`: both `timeout` and `timeoutMs` are given (keep one"),
    ("schedule: '@daily'\ncommand: x\ntimeoutMs: -1\n", "field `timeoutMs`: must be a whole number greater than 0"),
    ("schedule: '@daily'\ncommand: x\ntoken_budget: 0\n", "field `token_budget`: must be a whole number greater than 0"),
    ("schedule: '@daily'\ncommand: x\ngrace: -1\n", "field `grace`: must be a whole number at least 0"),
    ("schedule: '@daily'\ncommand: x\nenabled: 'no'\n", "field `enabled`: must be true or false, not a string"),
    ("schedule: '@daily'\ncommand: x\nenabled: 1\n", "field `enabled`: must be true or false, not a number"),
    ("schedule: '@daily'\ncommand: x\nenv: [A]\n", "field `env`: must be a mapping, not a list"),
    ("schedule: '@daily'\ncommand: x\nenv: {1A: x}\n", "field `env`: `1A` is not a valid variable name"),
    ("schedule: '@daily'\ncommand: x\nenv: {A-B: x}\n", "field `env`: `A-B` is not a valid variable name"),
    ("schedule: '@daily'\ncommand: x\nenv: {DEBUG: yes}\n",
     "field `env`: `DEBUG` is a boolean, not a string (quote the value, e.g. `DEBUG: \"true\"`)"),
    ("schedule: '@daily'\ncommand: x\nenv: {A: }\n", "field `env`: `A` is empty, not a string"),
    ("schedule: '@daily'\ncommand: x\nenv: {A: [1]}\n", "field `env`: `A` is a list, not a string"),
    ("schedule: '@daily'\ncommand: x\ntags: reports\n", "field `tags`: must be a list of strings"),
    ("schedule: '@daily'\ncommand: x\ndescription: [a]\n", "field `description`: must be a string, not a list"),
    ("schedule: '@daily'\ncommand: '  '\n", "field `command`: is empty"),
    ("schedule: '@daily'\ncommand: []\n", "field `command`: is an empty list"),
    ("schedule: '@daily'\ncommand: [run, 8080]\n", "field `command`: item 2 is a number, not a string"),
    ("schedule: '@daily'\ncommand: {a: b}\n", "field `command`: must be a string or a list of strings, not a mapping"),
    ("schedule: '@daily'\ncommand:\n", "field `command`: must be a string or a list of strings, not empty"),
    ("command: x\n", "field `schedule`: is missing (add e.g. `schedule: \"*/15 * * * *\"`)"),
    ("schedule: '@daily'\n", "field `command`: is missing"),
    ("schedule: 5\ncommand: x\n", "field `schedule`: must be a string, not a number (quote it"),
    ("schedule: '61 * * * *'\ncommand: x\n",
     "field `schedule`: `61 * * * *`: minute field `61`: `61` is not a valid minute (0-59)"),
    ("schedule: '* * * *'\ncommand: x\n", "field `schedule`: `* * * *` has 4 fields"),
    ("schedule: '@every 5m'\ncommand: x\n", "field `schedule`: `@every 5m` has 2 fields"),
    ("schedule: '@reboot'\ncommand: x\n", "field `schedule`: `@reboot` unknown macro"),
    ("schedule: '@daily'\nprompt: summarise the news\n",
     "field `prompt`: akm `prompt` tasks are not run by this worker (it runs only `command` tasks"),
    ("schedule: '@daily'\nworkflow: w.yml\ncommand: x\n", "field `workflow`: akm `workflow` tasks are not run"),
    ("", "the file is empty (write at least `schedule:` and `command:`)"),
    ("# only a comment\n", "the file is empty"),
    ("- a\n- b\n", "the file holds a list, not a mapping"),
    ("just text\n", "the file holds a string, not a mapping"),
    ("schedule: [\n", "YAML syntax error at line 2, column 1:"),
    ("schedule: '@daily'\n  command: x\n", "YAML syntax error at line 2, column 3: did not find expected key"),
    ("a: *nope\n", "YAML syntax error at line 1, column 4: found undefined alias"),
    ("? [a]\n: b\n", "YAML syntax error"),
    ("a: !!python/object:os.system x\n", "YAML syntax error"),
])
def test_invalid_file_gives_one_line_with_file_field_and_fix(stash, text, message):
    e = invalid(stash, text)
    line = str(e)
    assert "\n" not in line
    assert line.startswith(str(stash / "tasks" / "t.yml") + ": ")
    assert message in line


def test_non_utf8_file_is_one_clean_line(stash):
    (stash / "tasks" / "t.yml").write_bytes(b"schedule: '@daily'\ncommand: caf\xe9\n")
    assert "not UTF-8 text (bad byte at offset 31) (save it as UTF-8)" in str(_raises(stash))


def test_nul_bytes_are_a_yaml_error_not_a_crash(stash):
    (stash / "tasks" / "t.yml").write_bytes(b"schedule: '@daily'\x00\n")
    assert "YAML" in str(_raises(stash))


def test_deeply_nested_yaml_is_a_clean_error(stash):
    (stash / "tasks" / "t.yml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert str(_raises(stash)).startswith(str(stash / "tasks" / "t.yml"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_one_clean_line(stash):
    path = write_task(stash, "t", GOOD)
    path.chmod(0)
    try:
        assert "cannot read it: Permission denied" in str(_raises(stash))
    finally:
        path.chmod(0o644)


def test_directory_named_like_a_task_is_invalid(stash):
    (stash / "tasks" / "t.yml").mkdir()
    assert "is not a regular file" in str(_raises(stash))


def test_fifo_named_like_a_task_is_invalid_not_a_hang(stash):
    os.mkfifo(stash / "tasks" / "t.yml")
    assert "is not a regular file" in str(_raises(stash))


def test_dangling_symlink_is_one_clean_line(stash):
    (stash / "tasks" / "t.yml").symlink_to(stash / "gone.yml")
    assert "cannot read it: No such file or directory" in str(_raises(stash))


def test_two_files_for_one_id_is_an_error_for_that_id(stash):
    write_task(stash, "t", GOOD)
    write_task(stash, "t", GOOD, ext="yaml")
    assert "two files for one task: t.yaml and t.yml (keep one of them)" in str(_raises(stash))
    tasks, errors = load_all(Stash(stash))
    assert tasks == [] and len(errors) == 1


def _raises(stash):
    with pytest.raises(InvalidTask) as e:
        load(stash)
    return e.value


# --- load_all -----------------------------------------------------------------

def test_one_bad_file_never_stops_the_others(stash):
    write_task(stash, "a", GOOD)
    write_task(stash, "b", "schedule: nope\ncommand: x\n")
    write_task(stash, "c", GOOD, ext="yaml")
    write_task(stash, "Bad Name", GOOD)
    (stash / "tasks" / "d.yml").write_bytes(b"\xff")
    tasks, errors = load_all(Stash(stash))
    assert [t.id for t in tasks] == ["a", "c"]
    assert [Path(e.path).name for e in errors] == ["Bad Name.yml", "b.yml", "d.yml"]
    assert "`Bad Name.yml` is not a valid task file name (rename it to lowercase" in str(errors[0])


def test_hidden_and_other_files_are_ignored(stash):
    write_task(stash, ".draft", GOOD)
    (stash / "tasks" / "notes.txt").write_text("x")
    (stash / "tasks" / "t.yml.swp").write_text("x")
    assert load_all(Stash(stash)) == ([], [])


def test_missing_tasks_dir_is_empty_not_an_error(tmp_path):
    assert load_all(Stash(tmp_path)) == ([], [])


# --- the CLI ------------------------------------------------------------------

def test_validate_all_valid_exits_0_with_a_summary(stash, akm):
    write_task(stash, "a", GOOD)
    write_task(stash, "b", GOOD)
    r = akm("tasks", "validate")
    assert (r.returncode, r.stdout, r.stderr) == (0, "2 valid, 0 invalid\n", "")


def test_validate_prints_one_line_per_invalid_file_and_exits_1(stash, akm):
    write_task(stash, "a", GOOD)
    write_task(stash, "b", "schedule: '@daily'\ncommand: x\ntimeot: 5\n")
    write_task(stash, "c", "[")
    r = akm("tasks", "validate")
    assert r.returncode == 1
    assert r.stdout == "1 valid, 2 invalid\n"
    assert r.stderr.splitlines() == [
        f"{stash}/tasks/b.yml: field `timeot`: unknown field (did you mean `timeout`?)",
        f"{stash}/tasks/c.yml: YAML syntax error at line 2, column 1: "
        f"did not find expected node content (fix the YAML there)",
    ]


def test_validate_json_lists_every_file(stash, akm):
    write_task(stash, "a", GOOD)
    write_task(stash, "b", "schedule: '@daily'\n")
    r = akm("tasks", "validate", "--format", "json")
    rows = json.loads(r.stdout)
    assert r.returncode == 1
    assert [(x["id"], x["valid"]) for x in rows] == [("a", True), ("b", False)]
    assert rows[1]["field"] == "command" and rows[1]["problem"] == "is missing"


def test_validate_empty_tasks_dir_says_so_and_exits_0(stash, akm):
    r = akm("tasks", "validate")
    assert r.returncode == 0 and f"no task files in {stash}/tasks" in r.stdout


def test_validate_missing_tasks_dir_exits_0(stash, akm):
    (stash / "tasks").rmdir()
    assert akm("tasks", "validate").returncode == 0


def test_validate_without_a_stash_exits_66(tmp_path):
    r = run_akm(tmp_path / "nowhere", "tasks", "validate")
    assert r.returncode == 66
    assert r.stderr == (f"akm: stash directory {tmp_path}/nowhere does not exist "
                        f"(set AKM_STASH or pass --stash DIR)\n")


def test_list_shows_next_run_and_invalid_files_without_creating_state_db(stash, akm):
    write_task(stash, "a", "schedule: '0 0 1 1 * 2030'\ncommand: x\n")
    write_task(stash, "b", "schedule: '@daily'\ncommand: x\nenabled: false\n")
    write_task(stash, "c", "schedule: nope\ncommand: x\n")
    r = akm("tasks", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "ENABLED", "SCHEDULE", "NEXT", "RUN", "LAST", "STATUS", "LAST", "RUN"]
    assert lines[1].split() == ["a", "yes", "0", "0", "1", "1", "*", "2030", "2030-01-01T00:00:00Z", "-", "-"]
    assert lines[2].split() == ["b", "no", "@daily", "-", "-", "-"]
    assert lines[3].split() == ["c", "-", "-", "-", "invalid", "-"]
    assert not (stash / "state.db").exists()


def _state_db(stash, rows):
    conn = sqlite3.connect(stash / "state.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, "
                 "trigger TEXT NOT NULL, status TEXT NOT NULL, started_at TEXT, ended_at TEXT)")
    conn.executemany("INSERT INTO runs (task_id, trigger, status, started_at) VALUES (?, 'manual', ?, ?)",
                     rows)
    conn.commit()
    conn.close()


def test_list_shows_the_latest_run_of_each_task(stash, akm):
    write_task(stash, "a", GOOD)
    write_task(stash, "b", GOOD)
    write_task(stash, "c", "schedule: nope\ncommand: x\n")
    _state_db(stash, [("a", "failed", "2026-11-24T06:00:00.000Z"),
                      ("a", "success", "2026-11-25T06:00:00.000Z"),
                      ("c", "error", "2026-11-25T05:00:00.000Z")])
    r = akm("tasks", "list", "--format", "json")
    rows = {x["id"]: x for x in json.loads(r.stdout)}
    assert r.returncode == 0
    assert (rows["a"]["last_status"], rows["a"]["last_run"]) == ("success", "2026-11-25T06:00:00.000Z")
    assert (rows["b"]["last_status"], rows["b"]["last_run"]) == (None, None)
    assert (rows["c"]["last_status"], rows["c"]["last_run"]) == ("invalid", "2026-11-25T05:00:00.000Z")
    assert rows["c"]["error"].endswith("(write 5 fields `minute hour day-of-month month day-of-week`, "
                                       "e.g. `*/15 * * * *`, or @hourly, @daily, @weekly, @monthly, @yearly)")


def test_list_with_an_unreadable_state_db_still_lists(stash, akm):
    write_task(stash, "a", GOOD)
    (stash / "state.db").write_text("not a database")
    r = akm("tasks", "list")
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[0] == "a"


def test_list_of_an_empty_stash_says_so(stash, akm):
    r = akm("tasks", "list")
    assert r.returncode == 0 and "no task files in" in r.stderr
    assert json.loads(akm("tasks", "list", "--format", "json").stdout) == []


# --- fuzz: no traceback, ever -------------------------------------------------

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                    st.text(max_size=20))
_value = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
_doc = st.dictionaries(st.one_of(st.sampled_from(FIELDS + ("prompt", "timeot", "Env")),
                                 st.text(max_size=10), st.integers()), _value, max_size=8)
_yamlish = st.one_of(
    st.binary(max_size=200),
    st.text(alphabet=":- \n\t[]{}'\"#&*!|>%@`,?\\abc01", max_size=120).map(str.encode),
    _doc.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(blobs=st.lists(_yamlish, min_size=1, max_size=4))
def test_fuzzed_task_files_never_raise_from_load_all(blobs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "tasks").mkdir()
    for i, blob in enumerate(blobs):
        (root / "tasks" / f"t{i}.yml").write_bytes(blob)
    tasks, errors = load_all(Stash(root))
    assert len(tasks) + len(errors) == len(blobs)
    for e in errors:
        assert "\n" not in str(e) and str(e).startswith(str(root / "tasks"))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=_yamlish)
def test_fuzzed_task_file_through_the_cli_never_shows_a_traceback(blob, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzcli")
    (root / "tasks").mkdir()
    (root / "tasks" / "t.yml").write_bytes(blob)
    for args, codes in ((("tasks", "validate"), {0, 1}), (("tasks", "list"), {0}),
                        (("tasks", "install", "--print"), {0, 1})):
        r = run_akm(root, *args)
        assert r.returncode in codes, (args, r.stderr)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr


def test_cached_task_follows_every_edit(stash, akm):
    """A run reads the parsed-task cache; any change to the file must show."""
    import os
    import time
    path = write_task(stash, "edit", 'schedule: "@daily"\ncommand: "echo one"\n')
    old = time.time() - 10
    os.utime(path, (old, old))       # old enough to be cached
    assert akm("tasks", "run", "edit").stdout == "one\n"
    assert (stash / ".akm/cache/tasks/edit.json").exists()
    assert akm("tasks", "run", "edit").stdout == "one\n"   # served from the cache
    path.write_text('schedule: "@daily"\ncommand: "echo two"\n')   # same size, same inode
    assert akm("tasks", "run", "edit").stdout == "two\n"
    path.write_text('schedule: "@daily"\ncommand: ""\n')
    assert akm("tasks", "run", "edit").returncode == 65
    path.unlink()
    assert akm("tasks", "run", "edit").returncode == 64


def test_malformed_reference_and_unquoted_command_are_invalid_with_the_fix(stash, akm):
    write_task(stash, "ref", 'schedule: "@daily"\ncommand: "true"\nenv:\n  A: "${B"\n')
    write_task(stash, "boolcmd", 'schedule: "@daily"\ncommand: true\n')
    write_task(stash, "ok", 'schedule: "@daily"\ncommand: "true"\nenv:\n  A: "$${B} ${C:-d} $HOME"\n')
    r = akm("tasks", "validate")
    assert r.returncode == 1
    assert "ref.yml: field `env`: `A` has a malformed `${...}`" in r.stderr
    assert 'boolcmd.yml: field `command`' in r.stderr and 'quote it: `command: "true"`' in r.stderr
    assert "ok.yml" not in r.stderr


def test_a_stash_that_is_a_file_says_so(tmp_path, akm):
    f = tmp_path / "afile"
    f.write_text("")
    r = akm("tasks", "list", "--stash", str(f))
    assert r.returncode == 66 and "is not a directory" in r.stderr
