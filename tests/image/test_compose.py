"""docker-compose.yml: accepted by Compose v2 and v1, and the stack comes up."""

import os
import shutil
import subprocess

import pytest

from .conftest import PGID, PUID, REPO, make_stash, runs, wait_for

pytestmark = pytest.mark.docker

SECRET = "sk-compose-9b8a7c6d5e4f"


def _compose_v1():
    return shutil.which("docker-compose")


def _compose_v2():
    done = subprocess.run(["docker", "compose", "version"], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def project(tmp_path):
    """A compose project like a user's: the compose file, .env from the
    example, and a stash (from the example one, plus a task that fires fast)."""
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    stash = tmp_path / "stash"
    shutil.copytree(REPO / "stash", stash)
    make_stash(stash, {"tick": 'schedule: "*/2 * * * * * *"\ncommand: echo tick\n'})
    env = (REPO / ".env.example").read_text()
    env += f"\nPUID={PUID}\nPGID={PGID}\nMY_API_KEY={SECRET}\nAKM_POLL_SECONDS=2\n"
    (tmp_path / ".env").write_text(env)
    return tmp_path


def _run(argv, cwd, timeout=120):
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.skipif(not _compose_v1(), reason="docker-compose (v1) not installed")
def test_compose_v1_accepts_the_file(project):
    done = _run(["docker-compose", "config"], project)
    assert done.returncode == 0, done.stderr
    assert "container_name: worker" in done.stdout


def test_compose_v2_accepts_the_file(project, docker_client):
    if not _compose_v2():
        pytest.fail("docker compose (v2 plugin) is not installed: run .ci/prepare")
    done = _run(["docker", "compose", "config"], project)
    assert done.returncode == 0, done.stderr
    assert "stop_grace_period: 30s" in done.stdout


def test_stack_comes_up(project, docker_client, image):
    if not _compose_v2():
        pytest.fail("docker compose (v2 plugin) is not installed: run .ci/prepare")
    try:
        existing = docker_client.containers.get("worker")
    except Exception:  # noqa: BLE001 - docker.errors.NotFound
        existing = None
    if existing is not None:
        pytest.skip("a container named `worker` already exists on this engine")
    name = f"akmtest{os.getpid()}"
    compose = ["docker", "compose", "-p", name]
    try:
        up = _run(compose + ["up", "-d", "--no-build"], project, timeout=180)
        assert up.returncode == 0, up.stderr
        stash = project / "stash"
        wait_for(lambda: [r for r in runs(stash, "tick") if r["status"] == "success"], 30,
                 what="a scheduled run under compose")
        worker = docker_client.containers.get("worker")
        code, out = worker.exec_run(["akm", "healthcheck"])
        assert code == 0, out
        code, out = worker.exec_run(["akm", "tasks", "run", "token-check"])
        assert code == 0 and b"token of 23 characters, printed: ***" in out, out
        report = docker_client.containers.list(
            filters={"label": [f"com.docker.compose.project={name}",
                               "com.docker.compose.service=report"]})[0]
        assert report.status == "running"
        # the tasks' secrets reach the worker only
        env_worker = worker.attrs["Config"]["Env"]
        env_report = report.attrs["Config"]["Env"]
        assert f"MY_API_KEY={SECRET}" in env_worker
        assert not [e for e in env_report if SECRET in e or e.startswith("EXAMPLE_TOKEN=")]
    finally:
        down = _run(compose + ["down", "--timeout", "30"], project, timeout=120)
        assert down.returncode == 0, down.stderr
