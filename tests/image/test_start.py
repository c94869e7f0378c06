"""Starting the image: an empty stash, a stash it cannot write, the version."""

import os

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


def _context(tmp_path, files: dict[str, bytes]):
    from .conftest import REPO
    ctx = tmp_path / "ctx"
    (ctx / "offline").mkdir(parents=True)
    (ctx / "Dockerfile").write_bytes((REPO / "Dockerfile").read_bytes())
    for name, data in files.items():
        (ctx / name).write_bytes(data)
    return ctx


def _build_supercronic_stage(ctx, *args):
    import subprocess
    return subprocess.run(["docker", "build", "--no-cache", "--target", "supercronic", *args,
                           "-t", "akm-worker-test-sc", str(ctx)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the pinned sha256 is amd64's")
def test_tampered_offline_deb_fails_the_build(docker_client, tmp_path):
    ctx = _context(tmp_path, {"offline/supercronic_0.2.45-1_amd64.deb": b"not the real package"})
    done = _build_supercronic_stage(ctx)
    assert done.returncode != 0
    assert "sha256 does not match the pinned" in done.stdout + done.stderr


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="amd64 file names")
def test_offline_binary_is_checked_against_its_sha1(docker_client, tmp_path):
    import hashlib
    import subprocess
    fake = b"#!/bin/sh\necho fake\n"
    ctx = _context(tmp_path, {"offline/supercronic-linux-amd64": fake})
    done = _build_supercronic_stage(ctx, "--build-arg", "SUPERCRONIC_VERSION=v9.9.9")
    assert done.returncode != 0 and "no SHA1SUM pinned" in done.stdout + done.stderr
    sha1 = hashlib.sha1(fake).hexdigest()
    done = _build_supercronic_stage(ctx, "--build-arg", "SUPERCRONIC_VERSION=v9.9.9",
                                    "--build-arg", f"SUPERCRONIC_SHA1SUM={sha1}")
    assert done.returncode == 0, done.stdout + done.stderr
    out = subprocess.run(["docker", "run", "--rm", "akm-worker-test-sc", "cat", "/out/version"],
                         capture_output=True, text=True).stdout
    assert out.strip() == f"v9.9.9 (upstream release binary supercronic-linux-amd64, sha1 {sha1})"
    subprocess.run(["docker", "rmi", "-f", "akm-worker-test-sc"], capture_output=True)
