"""The image under faults: the whole container killed mid-run and started
again; `docker stop` while a task ignores SIGTERM; a corrupted state.db at
start. Needs a Docker engine and builds the image (tests/image/conftest.py's
fixtures); skipped when no engine answers unless AKM_REQUIRE_DOCKER=1."""

import time

import pytest

from image.conftest import (docker_client, image, logs, make_stash, remove,  # noqa: F401
                            runs, start, wait_for)

from .conftest import SECRET, assert_sound, integrity, no_secret_on_volume

pytestmark = [pytest.mark.fault, pytest.mark.docker]


def _soon(seconds=6) -> int:
    """A 7-field schedule second a few seconds from now (fires once a minute)."""
    return int(time.time() + seconds) % 60


def _after_restart(rows, t_iso):
    return [r for r in rows if r["started_at"] > t_iso]


def test_container_killed_mid_run_and_started_again(docker_client, image, tmp_path):
    stash = make_stash(tmp_path / "stash", {
        "long": f"""
            schedule: "{_soon()} * * * * * *"
            timeout: 900
            env:
              KEY_COPY: "${{MY_API_KEY}}"
            command: echo "long started $KEY_COPY"; sleep 600
            """,
        "tick": """
            schedule: "*/2 * * * * * *"
            command: echo "tick $MY_API_KEY"
            """,
    })
    c = start(docker_client, image, stash, env={"MY_API_KEY": SECRET})
    try:
        wait_for(lambda: [r for r in runs(stash, "long") if r["status"] == "running"], 75,
                 what="long running")
        c.kill()                                   # SIGKILL to everything, no warning
        c.reload()
        killed_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        [victim] = [r for r in runs(stash, "long") if r["status"] == "running"]
        c.start()
        # The other task goes on after the restart...
        wait_for(lambda: len([r for r in _after_restart(runs(stash, "tick"), killed_at)
                              if r["status"] == "success"]) >= 3, 45, what="ticks after restart")
        # ...and the next look marks the killed run abandoned.
        wait_for(lambda: [r for r in runs(stash, "long") if r["id"] == victim["id"]
                          and r["status"] == "abandoned"], 20, what="victim abandoned")
        c.reload()
        assert c.status == "running" and c.attrs["RestartCount"] == 0
        assert SECRET not in logs(c)
        assert "Traceback" not in logs(c)
    finally:
        remove(c)
    assert_sound(stash)


@pytest.mark.parametrize("grace", [30, 10], ids=["compose-grace-30s", "docker-default-10s"])
def test_docker_stop_with_a_task_that_ignores_sigterm(docker_client, image, tmp_path, grace):
    stash = make_stash(tmp_path / "stash", {
        "stubborn": f"""
            schedule: "{_soon()} * * * * * *"
            timeout: 900
            command: trap '' TERM; echo stubborn started; sleep 600
            """,
    })
    c = start(docker_client, image, stash)
    try:
        wait_for(lambda: [r for r in runs(stash, "stubborn") if r["status"] == "running"], 75,
                 what="stubborn running")
        time.sleep(1)
        t0 = time.monotonic()
        c.stop(timeout=grace)
        took = time.monotonic() - t0
        c.reload()
        code = c.attrs["State"]["ExitCode"]
        tail = logs(c)[-3000:]
    finally:
        remove(c)
    statuses = [r["status"] for r in runs(stash, "stubborn")]
    # Runner: SIGTERM ignored, SIGKILL after the image's 5 s AKM_KILL_GRACE,
    # recorded; the scheduler exits on its own before Docker's deadline, even
    # a plain `docker stop`'s 10 s.
    assert "running" not in statuses, statuses
    assert took < grace - 2 and code == 0, (took, code, tail)
    assert statuses[-1] == "interrupted", statuses
    assert "ignored SIGTERM" in (stash / runs(stash, "stubborn")[-1]["log_path"]).read_text()
    assert_sound(stash)
    final = statuses[-1]
    print(f"docker stop -t {grace}: {took:.1f} s, exit {code}, run recorded {final}")


def test_corrupted_state_db_at_start_is_no_crash_loop(docker_client, image, tmp_path):
    stash = make_stash(tmp_path / "stash", {
        "tick": """
            schedule: "*/2 * * * * * *"
            command: echo tick
            """,
    })
    (stash / "state.db").write_bytes(b"this is not a database\n" * 400)
    from image.conftest import chown_tree
    chown_tree(stash)
    c = start(docker_client, image, stash)
    try:
        time.sleep(12)
        c.reload()
        text = logs(c)
        assert c.status == "running" and c.attrs["RestartCount"] == 0, text[-2000:]
        assert "Traceback" not in text and "internal error" not in text, text[-2000:]
        assert "corrupted" in text and "move it aside" in text, text[-2000:]
        # The documented recovery, while it runs: move the files aside.
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            p = stash / name
            if p.exists():
                p.rename(stash / f"{name}.bad")
        wait_for(lambda: [r for r in runs(stash, "tick") if r["status"] == "success"], 20,
                 what="runs recorded in a new state.db")
    finally:
        remove(c)
    assert integrity(stash) == "ok"
    no_secret_on_volume(stash)
