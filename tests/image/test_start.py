"""Starting the image: an empty stash, a stash it cannot write, the version."""

import os
import time

import pytest

from .conftest import PGID, PUID, exec_akm, logs, remove, start, wait_for

pytestmark = pytest.mark.docker


def test_empty_stash_keeps_running(docker_client, image, tmp_path):
    stash = tmp_path / "stash"
    stash.mkdir()
    if os.getuid() == 0:
        os.chown(stash, PUID, PGID)
    c = start(docker_client, image, stash)
    try:
        wait_for(lambda: "supercronic started" in logs(c), 20, what="the scheduler to start")
        text = logs(c)
        assert "no tasks directory at /stash/tasks" in text
        code, out = exec_akm(c, "healthcheck")
        assert code == 0, out + text
        # a task directory appearing later is picked up
        (stash / "tasks").mkdir()
        (stash / "tasks" / "later.yml").write_text('schedule: "* * * * * * *"\ncommand: echo later\n')
        wait_for(lambda: "[later] later" in logs(c), 30, what="a task added to a new tasks/")
        c.reload()
        assert c.status == "running"
    finally:
        remove(c)


@pytest.mark.skipif(os.getuid() != 0, reason="needs a stash owned by another user")
def test_unwritable_stash_names_the_fix(docker_client, image, tmp_path):
    stash = tmp_path / "stash"
    (stash / "tasks").mkdir(parents=True)
    os.chmod(stash, 0o755)   # owned by root; the worker is PUID 1000
    c = start(docker_client, image, stash, env={"PUID": "1000", "PGID": "1000"})
    try:
        result = c.wait(timeout=30)
        text = logs(c)
        assert result["StatusCode"] == 78, text
        assert "not writable by uid 1000 gid 1000" in text
        assert "PUID=0 PGID=0" in text and "chown" in text
    finally:
        remove(c)


def test_version_names_supercronic(docker_client, image):
    out = docker_client.containers.run(image, ["akm", "version"], remove=True).decode()
    assert out.startswith("akm-worker ")
    line = out.splitlines()[1]
    assert line.startswith("supercronic ") and "sha" in line, out


def test_runs_unprivileged_and_in_tz(docker_client, image, tmp_path):
    stash = tmp_path / "stash"
    (stash / "tasks").mkdir(parents=True)
    if os.getuid() == 0:
        os.chown(stash, PUID, PGID)
        os.chown(stash / "tasks", PUID, PGID)
    c = start(docker_client, image, stash, env={"TZ": "Asia/Kolkata"})
    try:
        wait_for(lambda: "supercronic started" in logs(c), 20, what="the scheduler to start")
        code, out = c.exec_run(["sh", "-c", "cat /proc/1/status; date +%z"])
        text = out.decode()
        assert f"Uid:\t{PUID}\t{PUID}\t{PUID}\t{PUID}" in text
        assert text.strip().endswith("+0530")
        assert "TZ=Asia/Kolkata" in logs(c)
    finally:
        remove(c)
