"""gokiq as a user installs it: the wheel, in a new venv, without the test extras.

The wheel is built from this checkout and installed (from PyPI, constrained by
requirements.lock, as docker/Dockerfile does) into a venv of its own, once per session. That
venv must hold exactly the lock's packages (so the lock is complete and the image gets what a
user's `pip install` gets) and nothing only the tests need; its `gokiq-bridge` and
`celery -A gokiq_celery worker`, started outside the source tree, run a job of the example app
through the real sidecar and a real redis-server.

Skip with `-m "not install"` (it needs PyPI, or pip's cache, the first time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO
from .e2e.conftest import Stack, running

pytestmark = pytest.mark.install

LOCK = REPO / "requirements.lock"
SOURCES = (
    "pyproject.toml",
    "README.md",
    "celeryconfig.py",
    "gokiq_celery",
    "bridge",
    "gokiq_history",
    "gokiq_ingest",
)
NOT_SOURCES = shutil.ignore_patterns("__pycache__")
# Installed with any venv; not gokiq's business.
VENV_TOOLS = {"pip", "setuptools", "wheel"}


def _run(argv: list[str | Path], **kwargs) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs
    )
    assert done.returncode == 0, f"{argv[:4]} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a new venv holding the wheel and its runtime dependencies only."""
    root = tmp_path_factory.mktemp("install")
    # Built from a copy of what docker/Dockerfile copies: setuptools never cleans a build/
    # folder, so a wheel built in the checkout could carry modules deleted since.
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=NOT_SOURCES)
        else:
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "dist", source])
    [wheel] = (root / "dist").glob("gokiq-*.whl")
    _run([sys.executable, "-m", "venv", root / "venv"])
    bin_dir = root / "venv" / "bin"
    _run([bin_dir / "pip", "install", "-q", "--disable-pip-version-check", "-c", LOCK, wheel])
    return bin_dir


def test_the_wheel_is_built_from_what_the_image_copies():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        copied |= {src.rstrip("/") for src in line.split()[:-1]}
    image_only = {"requirements.lock", "docker/healthcheck.py", "docker/entrypoint.sh"}
    assert copied - image_only == set(SOURCES)


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _installed_pins(bin_dir: Path) -> dict[str, str]:
    frozen = _run([bin_dir / "pip", "list", "--format=freeze", "--disable-pip-version-check"])
    pins = {}
    for line in frozen.splitlines():
        name, _, version = line.partition("==")
        if canonicalize_name(name) not in VENV_TOOLS:
            pins[canonicalize_name(name)] = version
    return pins


def test_the_wheel_installs_exactly_the_lock(installed):
    """Nothing missing from the lock (the image installs it), nothing beyond it."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert _installed_pins(installed) == {**_lock_pins(), "gokiq": version}


def test_no_test_only_package_is_installed(installed):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    test_only = {
        canonicalize_name(Requirement(r).name) for r in extras["optional-dependencies"]["test"]
    }
    assert test_only == test_only - set(_installed_pins(installed))
    # The packages the development venv gets only through the test tools.
    for module in ("pytest", "hypothesis", "requests", "urllib3"):
        probe = subprocess.run(
            [installed / "python", "-c", f"import {module}"], capture_output=True
        )
        assert probe.returncode != 0, f"{module} is importable in the installed venv"


@pytest.fixture
def installed_stack(installed, tmp_path) -> Iterator[Stack]:
    workdir = tmp_path / "cwd"  # not the checkout: the processes import only what pip installed
    workdir.mkdir()
    with running(Stack(tmp_path, bin_dir=installed, workdir=workdir)) as stack:
        yield stack


def test_bridge_and_worker_from_the_installed_venv_run_a_job(installed, installed_stack):
    stack = installed_stack
    where = _run(
        [installed / "python", "-c", "import bridge, gokiq_celery; print(bridge.__file__)"],
        cwd=stack.bridge.cwd,
        env=stack.env,
    )
    assert Path(where).resolve().is_relative_to(installed.parent.resolve())
    assert os.path.samefile(stack.bridge.argv[0], installed / "gokiq-bridge")
    assert os.path.samefile(stack.worker.argv[0], installed / "celery")

    jid = stack.api1({"op": "perform_async", "class": "HardJob", "args": ["installed"]})
    [run] = stack.wait_runs([jid], "HardJob", timeout=120)
    assert json.loads(run["args"]) == ["installed"]
    assert requests.get(stack.worker_url + "/health", timeout=10).text == "ok\n"
