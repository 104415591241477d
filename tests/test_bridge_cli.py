"""`gokiq-bridge` start-up: the help text, and bad settings stopping it with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .bridge_support import _clean_environ
from .conftest import REPO


def run_cli(*args: str, **environ: str) -> subprocess.CompletedProcess:
    env = _clean_environ()
    env.update(environ)
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_explains_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in (
        "--config",
        "--queues",
        "--strict",
        "--redis-url",
        "--broker-url",
        "--sidekiq-version",
        "--batch-size",
        "--max-pending",
        "--poll-interval",
        "--heartbeat-ttl",
        "--recovery-interval",
        "--metrics-port",
        "--bind",
        "--log-level",
        "--log-format",
    ):
        assert option in result.stdout
    assert "REDIS_URL" in result.stdout and "GOKIQ_QUEUES" in result.stdout


@pytest.mark.parametrize(
    ("args", "environ", "key"),
    [
        ((), {"GOKIQ_QUEUES": ""}, "queues"),
        (("--queues", "a,1,2"), {}, "queues"),
        (("--queues", ""), {}, "queues"),
        (("--redis-url", "http://nope"), {}, "redis_url"),
        ((), {"GOKIQ_SIDEKIQ_VERSION": "5"}, "sidekiq_version"),
        (("--batch-size", "0"), {}, "publish_batch_size"),
        (
            (),
            {"GOKIQ_HEARTBEAT": "x", "GOKIQ_BRIDGE_HEARTBEAT_TTL": "soon"},
            "bridge_heartbeat_ttl",
        ),
    ],
)
def test_a_bad_setting_stops_start_up_naming_the_key(args, environ, key):
    result = run_cli(*args, **environ)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]


def test_a_bad_config_file_names_the_setting(tmp_path):
    config = tmp_path / "gokiq.yml"
    config.write_text("queues: [[critical, 3], [default, x]]\n")
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    assert "queues" in result.stderr

    config.write_text("no_such_setting: 1\n")
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    assert "no_such_setting" in result.stderr
