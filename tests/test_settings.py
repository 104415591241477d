"""Settings: YAML < environment < flags, and a clear error naming the bad key."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from gokiq_celery.settings import ConfigError, QueueSpec, load_settings, parse_queues

from .conftest import VENV_BIN


def test_defaults_and_derived_values():
    s = load_settings(environ={})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.broker_url == "redis://127.0.0.1:6379/1"
    assert s.pending_limit == 200 and s.max_retries == 25 and s.sidekiq_version == "auto"
    assert s.queues == (QueueSpec("default"),)
    assert "sidecar_token" not in repr(load_settings(environ={"GOKIQ_SIDECAR_TOKEN": "s3cret"}))


def test_yaml_then_environment_then_overrides(tmp_path):
    path = tmp_path / "gokiq.yml"
    path.write_text(
        "queues: [[critical, 3], default]\nmax_retries: 5\njob_timeout: 30\n"
        "queue_map: {default: sidekiq-default}\n"
    )
    env = {"GOKIQ_MAX_RETRIES": "7", "REDIS_URL": "redis://r:6379/4"}
    s = load_settings(path, environ=env, job_timeout=12)
    assert s.queues == (QueueSpec("critical", 3), QueueSpec("default", 0))
    assert (s.max_retries, s.job_timeout, s.redis_url) == (7, 12.0, "redis://r:6379/4")
    assert s.broker_url == "redis://r:6379/5"
    assert s.celery_queue("default") == "sidekiq-default" and s.celery_queue("x") == "x"


def test_queue_strings_like_sidekiqs_command_line():
    assert parse_queues("critical,3 default,1 low") == (
        QueueSpec("critical", 3),
        QueueSpec("default", 1),
        QueueSpec("low", 0),
    )


@pytest.mark.parametrize(
    ("text", "queues"),
    [
        ("critical,default", [("critical", 0), ("default", 0)]),  # Celery's -Q form
        ("critical,default,low", [("critical", 0), ("default", 0), ("low", 0)]),
        ("critical,3,default,1", [("critical", 3), ("default", 1)]),
        ("critical,default,2 low", [("critical", 0), ("default", 2), ("low", 0)]),
        ("critical,3;default", [("critical", 3), ("default", 0)]),
        ("q1,5 2x,1", [("q1", 5), ("2x", 1)]),
    ],
)
def test_a_comma_before_a_name_separates_queues(text, queues):
    assert parse_queues(text) == tuple(QueueSpec(name, weight) for name, weight in queues)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("critical,3,4", "weight 4 in 'critical,3,4' follows no queue name"),
        ("3,critical", "weight 3 in '3,critical' follows no queue name"),
        ("critical 3", "weight 3 in 'critical 3' follows no queue name"),
        ("critical,-1", "weight of 'critical' must be >= 0"),
    ],
)
def test_a_weight_must_follow_a_queue_name(text, message):
    with pytest.raises(ConfigError, match=re.escape(f"queues: {message}")):
        parse_queues(text)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"GOKIQ_MAX_RETRIES": "many"}, "max_retries"),
        ({"GOKIQ_SIDEKIQ_VERSION": "5"}, "sidekiq_version"),
        ({"GOKIQ_QUEUES": "critical,3,4"}, "queues"),
        ({"GOKIQ_QUEUES": " "}, None),  # blank means unset: the default applies
        ({"REDIS_URL": "http://x"}, "redis_url"),
        ({"CELERY_BROKER_URL": "kafka://x"}, "celery_broker_url"),
        ({"GOKIQ_JOB_TIMEOUT": "0"}, "job_timeout"),
        ({"GOKIQ_STRICT": "maybe"}, "strict"),
        ({"GOKIQ_QUEUE_MAP": "nonsense"}, "queue_map"),
        ({"GOKIQ_LOG_LEVEL": "chatty"}, "log_level"),
        ({"GOKIQ_SIDECAR_URL": "http:///jobs"}, "sidecar_url"),
        ({"GOKIQ_SIDECAR_TOKEN": "secret\r\nX-Evil: 1"}, "sidecar_token"),
        ({"GOKIQ_SIDECAR_TOKEN": "change-me-sidecar-token"}, "sidecar_token"),  # .env.example's
        ({"GOKIQ_SIDEKIQ_HEARTBEAT": "60"}, "sidekiq_heartbeat"),  # readers drop it at 60 s
        ({"GOKIQ_SIDEKIQ_HEARTBEAT": "-1"}, "sidekiq_heartbeat"),
        ({"GOKIQ_HISTORY_URL": "mysql://db/x"}, "history_url"),
        ({"GOKIQ_HISTORY_RETENTION": "0"}, "history_retention"),
        ({"GOKIQ_HISTORY_RETENTION": "soon"}, "history_retention"),
        ({"GOKIQ_HISTORY_BUFFER": "0"}, "history_buffer"),
        ({"GOKIQ_API_TOKENS": "secret,,b"}, "api_tokens"),
        ({"GOKIQ_API_PORT": "70000"}, "api_port"),
    ],
)
def test_bad_values_name_the_key(env, key):
    if key is None:
        assert load_settings(environ=env).queues == (QueueSpec("default"),)
        return
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert str(info.value).startswith(key)
    assert "secret" not in str(info.value)  # a bad token is named, never shown


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_a_monkey_patching_pool_is_refused_pointing_at_the_command_line(pool):
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"GOKIQ_WORKER_POOL": pool})
    assert str(info.value).startswith("worker_pool: ")
    assert f"celery -A gokiq_celery worker -P {pool}" in str(info.value)


def test_bad_config_files(tmp_path):
    unknown = tmp_path / "a.yml"
    unknown.write_text("max_retry: 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*max_retry"):
        load_settings(unknown, environ={})
    with pytest.raises(ConfigError, match=r"config file .*missing\.yml"):
        load_settings(tmp_path / "missing.yml", environ={})
    broken = tmp_path / "b.yml"
    broken.write_text("queues: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken, environ={})


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "GOKIQ_SIDEKIQ_VERSION",
            "5",
            "sidekiq_version: must be auto, 6, 7, 8 or a version such as 6.4.1, got '5'",
        ),
        (
            "GOKIQ_WORKER_POOL",
            "gevent",  # would start, unpatched, and hang
            "worker_pool: gevent must be given on the worker's command line, where Celery "
            "monkey-patches before anything loads: leave worker_pool unset and run "
            "`celery -A gokiq_celery worker -P gevent`",
        ),
    ],
)
def test_the_worker_refuses_to_start_on_a_bad_setting(tmp_path, variable, value, message):
    """`celery -A gokiq_celery worker` stops with one line naming the key, not a traceback."""
    env = {**os.environ, variable: value}
    result = subprocess.run(
        [str(VENV_BIN / "celery"), "-A", "gokiq_celery", "worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"gokiq: bad setting: {message}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan"])
def test_a_history_retention_that_is_not_a_finite_duration_is_refused(value):
    """The fuzz test's find: NaN compares false with 0, so `<= 0` alone let it through."""
    with pytest.raises(ConfigError, match="history_retention"):
        load_settings(environ={}, history_retention=value)
