"""crontab.py: the lines supercronic gets, the `supercronic -test` filter, and
the atomic install, through the core and the real `akm tasks install`."""

import os
import stat
from pathlib import Path


from conftest import supercronic_exe, write_task
from worker.crontab import HEADER, check_lines, install, render
from worker.stash import Stash
from worker.taskfile import Task

LINE = "{} akm tasks run {} --trigger schedule --detach"


def supercronic():
    return supercronic_exe()


def counting(tmp_path, exe) -> tuple[str, Path]:
    """A wrapper that logs each call, to count how often supercronic runs."""
    log = tmp_path / "calls"
    wrapper = tmp_path / "supercronic-counting"
    wrapper.write_text(f'#!/bin/sh\necho x >> "{log}"\nexec "{exe}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def task(task_id, schedule="*/5 * * * *", enabled=True):
    return Task(id=task_id, path=Path(f"/s/tasks/{task_id}.yml"), schedule=schedule,
                command="x", enabled=enabled)


def test_render_is_one_line_per_enabled_task():
    text = render([task("a"), task("b", "@daily", enabled=False), task("c", "0 0 * * * 2027")])
    assert text == (LINE.format("*/5 * * * *", "a") + "\n"
                    + LINE.format("0 0 * * * 2027", "c") + "\n")


def test_render_of_nothing_is_empty():
    assert render([]) == ""


def test_check_lines_keeps_everything_in_one_supercronic_call(tmp_path):
    exe, log = counting(tmp_path, supercronic())
    lines = [LINE.format(s, f"t{i}") for i, s in enumerate(["* * * * *", "@hourly", "0 0 * * * 2030"] * 50)]
    assert check_lines(lines, exe) == (lines, [])
    assert calls(log) == 1


def test_check_lines_drops_each_line_supercronic_rejects_and_says_so(tmp_path):
    exe, log = counting(tmp_path, supercronic())
    good = [LINE.format("* * * * *", f"g{i}") for i in range(20)]
    bad1, bad2 = LINE.format("61 * * * *", "b1"), LINE.format("@reboot", "b2")
    lines = good[:5] + [bad1] + good[5:] + [bad2]
    kept, problems = check_lines(lines, exe)
    assert kept == good
    assert problems == [f"supercronic rejects crontab line `{bad1}` (the task is not scheduled)",
                        f"supercronic rejects crontab line `{bad2}` (the task is not scheduled)"]
    assert calls(log) < 20  # bisected, not one call per line


def test_check_lines_without_supercronic_keeps_the_lines(tmp_path):
    lines = [LINE.format("* * * * *", "a")]
    assert check_lines(lines, str(tmp_path / "no-such-supercronic")) == (lines, [])


def test_install_writes_the_crontab_that_supercronic_accepts(stash, tmp_path):
    import subprocess
    write_task(stash, "a", "schedule: '*/5 * * * *'\ncommand: x\n")
    write_task(stash, "b", "schedule: '0 0 * * * 2030'\ncommand: x\nenabled: false\n")
    write_task(stash, "c", "schedule: '30 0 9 * * 1-5 *'\ncommand: x\n")
    path, changed, problems = install(Stash(stash), tmp_path / "cron" / "crontab")
    assert (changed, problems) == (True, [])
    assert path.read_text() == HEADER.format(tasks=stash / "tasks") + (
        LINE.format("*/5 * * * *", "a") + "\n" + LINE.format("30 0 9 * * 1-5 *", "c") + "\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["crontab"]  # no temp file left behind
    exe = supercronic()
    assert subprocess.run([exe, "-test", str(path)], capture_output=True).returncode == 0


def test_install_leaves_an_unchanged_crontab_alone(stash, tmp_path):
    write_task(stash, "a", "schedule: '@daily'\ncommand: x\n")
    path, changed, _ = install(Stash(stash), tmp_path / "crontab")
    os.utime(path, (1, 1))
    assert install(Stash(stash), path)[1] is False
    assert path.stat().st_mtime == 1
    write_task(stash, "b", "schedule: '@daily'\ncommand: x\n")
    assert install(Stash(stash), path)[1] is True


def test_install_reports_invalid_files_and_schedules_the_rest(stash, tmp_path):
    write_task(stash, "a", "schedule: '@daily'\ncommand: x\n")
    write_task(stash, "b", "schedule: '@every 5m'\ncommand: x\n")
    path, changed, problems = install(Stash(stash), tmp_path / "crontab")
    assert len(problems) == 1 and problems[0].startswith(f"{stash}/tasks/b.yml: field `schedule`")
    assert path.read_text().endswith(LINE.format("@daily", "a") + "\n")


# --- the CLI ------------------------------------------------------------------

def test_cli_install_writes_to_akm_crontab_and_exits_0(stash, akm, tmp_path):
    write_task(stash, "a", "schedule: '@hourly'\ncommand: x\n")
    target = tmp_path / "ct"
    r = akm("tasks", "install", env={"AKM_CRONTAB": str(target)})
    assert (r.returncode, r.stdout, r.stderr) == (0, f"wrote {target} (1 task scheduled)\n", "")
    assert LINE.format("@hourly", "a") in target.read_text()
    r = akm("tasks", "install", env={"AKM_CRONTAB": str(target)})
    assert r.stdout == f"unchanged: {target} (1 task scheduled)\n"


def test_cli_install_defaults_to_home_akm_crontab(stash, akm, tmp_path):
    write_task(stash, "a", "schedule: '@hourly'\ncommand: x\n")
    r = akm("tasks", "install", env={"HOME": str(tmp_path)})
    assert r.returncode == 0 and (tmp_path / ".akm" / "crontab").is_file()


def test_cli_install_crontab_flag_wins(stash, akm, tmp_path):
    write_task(stash, "a", "schedule: '@hourly'\ncommand: x\n")
    r = akm("tasks", "install", "--crontab", tmp_path / "flag", env={"AKM_CRONTAB": str(tmp_path / "env")})
    assert r.returncode == 0 and (tmp_path / "flag").exists() and not (tmp_path / "env").exists()


def test_cli_install_with_an_invalid_file_writes_and_exits_1(stash, akm, tmp_path):
    write_task(stash, "a", "schedule: '@hourly'\ncommand: x\n")
    write_task(stash, "b", "schedule: '@hourly'\ncommand: x\ntimeot: 5\n")
    r = akm("tasks", "install", "--crontab", tmp_path / "ct")
    assert r.returncode == 1
    assert r.stderr == (f"{stash}/tasks/b.yml: field `timeot`: unknown field (did you mean `timeout`?)\n"
                        "akm: 1 task file(s) not scheduled (`akm tasks validate` checks them)\n")
    assert LINE.format("@hourly", "a") in (tmp_path / "ct").read_text()


def test_cli_install_that_cannot_write_exits_74(stash, akm, tmp_path):
    write_task(stash, "a", "schedule: '@hourly'\ncommand: x\n")
    (tmp_path / "file").write_text("")
    r = akm("tasks", "install", "--crontab", tmp_path / "file" / "crontab")
    assert r.returncode == 74
    assert r.stderr.startswith(f"akm: cannot write the crontab {tmp_path}/file/crontab: ")
    assert "Traceback" not in r.stderr


def test_cli_install_print_writes_nothing(stash, akm, tmp_path):
    write_task(stash, "a", "schedule: '@hourly'\ncommand: x\n")
    r = akm("tasks", "install", "--print", env={"HOME": str(tmp_path)})
    assert r.returncode == 0
    assert r.stdout == HEADER.format(tasks=stash / "tasks") + LINE.format("@hourly", "a") + "\n"
    assert not (tmp_path / ".akm").exists()


def test_cli_install_with_no_tasks_writes_an_empty_crontab(stash, akm, tmp_path):
    r = akm("tasks", "install", "--crontab", tmp_path / "ct")
    assert r.returncode == 0 and "(0 tasks scheduled)" in r.stdout


def test_cli_install_without_a_stash_exits_66(tmp_path):
    from conftest import run_akm
    assert run_akm(tmp_path / "nowhere", "tasks", "install", "--print").returncode == 66
