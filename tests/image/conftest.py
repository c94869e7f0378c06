"""Fixtures for the image tests: a Docker engine, the image built once per
session, and stashes on the host that containers bind-mount.

No engine answering: these tests skip, unless AKM_REQUIRE_DOCKER=1 (CI), which
makes that a failure. The image is built with the same command the README
gives (`docker build -t akm-worker:latest .`), from offline/ inputs where
.ci/prepare put them.
"""

import json
import os
import sqlite3
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("AKM_TEST_IMAGE", "akm-worker:latest")
# The uid the container runs as: the test's own user, or the usual first
# user of a host (1000) when the tests run as root, so privileges are dropped.
PUID = os.getuid() or 1000
PGID = os.getgid() or 1000


@pytest.fixture(scope="session")
def docker_client():
    required = os.environ.get("AKM_REQUIRE_DOCKER") == "1"
    try:
        import docker
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure means "no engine"
        if required:
            pytest.fail(f"AKM_REQUIRE_DOCKER=1 but no Docker engine answers: {e}")
        pytest.skip(f"no Docker engine answers ({e.__class__.__name__}); run .ci/prepare")
    yield client
    client.close()


@pytest.fixture(scope="session")
def image(docker_client):
    """Build the image once per session (the layer cache makes a rebuild cheap)."""
    if os.environ.get("AKM_TEST_NO_BUILD") != "1":
        t0 = time.monotonic()
        done = subprocess.run(["docker", "build", "-q", "-t", IMAGE, str(REPO)],
                              capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            pytest.fail(f"docker build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(f"image built in {time.monotonic() - t0:.1f} s")
    return IMAGE


def make_stash(root: Path, tasks: dict[str, str]) -> Path:
    """A stash owned by PUID:PGID, like a user's checkout on the host."""
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    for task_id, text in tasks.items():
        write(root, task_id, text)
    chown_tree(root)
    return root


def write(stash: Path, task_id: str, text: str) -> Path:
    path = Path(stash) / "tasks" / f"{task_id}.yml"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(textwrap.dedent(text).lstrip())
    if os.getuid() == 0:
        os.chown(tmp, PUID, PGID)
    os.replace(tmp, path)   # as `git pull` and most editors do
    return path


def chown_tree(root: Path) -> None:
    if os.getuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            os.chown(name, PUID, PGID)


def runs(stash: Path, task_id: str | None = None) -> list[dict]:
    """Rows of state.db's `runs`, oldest first, read straight from the file."""
    db = Path(stash) / "state.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        sql, params = "SELECT * FROM runs", ()
        if task_id:
            sql, params = sql + " WHERE task_id = ?", (task_id,)
        return [dict(r) for r in conn.execute(sql + " ORDER BY id", params)]
    except sqlite3.OperationalError:
        return []   # the schema is not there yet
    finally:
        conn.close()


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def logs(container) -> str:
    return container.logs(stdout=True, stderr=True).decode(errors="replace")


def exec_akm(container, *args, user: str | None = None) -> tuple[int, str]:
    kw = {"user": user} if user else {}
    code, out = container.exec_run(["akm", *args], **kw)
    return code, out.decode(errors="replace")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def start(docker_client, image, stash: Path, env: dict | None = None, name: str | None = None, **kw):
    environment = {"PUID": str(PUID), "PGID": str(PGID), "AKM_POLL_SECONDS": "2"}
    environment.update(env or {})
    return docker_client.containers.run(
        image, detach=True, name=name or unique("akm-test"),
        environment=environment,
        volumes={str(stash): {"bind": "/stash", "mode": "rw"}}, **kw)


def remove(container) -> None:
    try:
        container.remove(force=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def status_json(container) -> dict:
    code, out = container.exec_run(["cat", "/tmp/akm/scheduler.json"])
    return json.loads(out) if code == 0 else {}
