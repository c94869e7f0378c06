"""Shared fixtures: a real stash on disk and the real `akm` command."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The console script pip installed next to this interpreter: tests run what
# users run, as a real subprocess.
AKM = str(Path(sys.executable).with_name("akm"))


@pytest.fixture
def stash(tmp_path) -> Path:
    root = tmp_path / "stash"
    (root / "tasks").mkdir(parents=True)
    return root


def write_task(stash: Path, task_id: str, text: str, ext: str = "yml") -> Path:
    """Write tasks/<id>.<ext> from a (dedented) YAML string."""
    path = Path(stash) / "tasks" / f"{task_id}.{ext}"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def run_akm(stash, *args, env=None, timeout=60, **kw) -> subprocess.CompletedProcess:
    """Run `akm ARGS` against STASH as a subprocess; text output captured."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AKM_")}
    full_env["AKM_STASH"] = str(stash)
    full_env.update(env or {})
    return subprocess.run([AKM, *map(str, args)], env=full_env, capture_output=True,
                          text=True, errors="replace", timeout=timeout, **kw)


@pytest.fixture
def akm(stash):
    """`akm(*args, env=...)` runs the real CLI against the test's stash."""
    def call(*args, **kw):
        return run_akm(stash, *args, **kw)
    return call


def supercronic_exe() -> str:
    """The real supercronic, or skip (fail where AKM_REQUIRE_SUPERCRONIC is set, as in CI)."""
    exe = shutil.which("supercronic")
    if exe is None:
        if os.environ.get("AKM_REQUIRE_SUPERCRONIC"):
            pytest.fail("supercronic is not on PATH and AKM_REQUIRE_SUPERCRONIC is set")
        pytest.skip("supercronic is not on PATH")
    return exe
