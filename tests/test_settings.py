"""Settings: YAML < environment < flags, and a clear error naming the bad key."""

from __future__ import annotations

import json
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
    argv = ["celery", "-A", "gokiq_celery", "worker"]
    assert refused_start(argv, {**os.environ, variable: value}, tmp_path) == (
        f"gokiq: bad setting: {message}"
    )


def refused_start(argv: list[str], env: dict[str, str], cwd) -> str:
    """Start a program of the venv that must refuse its settings: exit 2; its stderr."""
    result = subprocess.run(
        [str(VENV_BIN / argv[0]), *argv[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr.strip()


# -- gokiq-api's clients: api_clients, api_clients_file, api_tokens ---------------------------

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"


def clients_env(*clients: dict) -> dict[str, str]:
    return {"GOKIQ_API_CLIENTS": json.dumps(list(clients))}


def test_clients_come_from_the_setting_the_file_and_api_tokens(tmp_path):
    path = tmp_path / "clients.yml"
    path.write_text(f"- {{name: etl, token: {TOKEN_B}, queues: [low-*], rate: 5, burst: 20}}\n")
    yml = tmp_path / "gokiq.yml"
    yml.write_text(
        f"api_clients:\n  - name: billing\n    token: {TOKEN_A}\n"
        "    classes: ['Billing::*']\n    queues: [default]\n    read: true\n"
        f"api_clients_file: {path}\n"
    )
    s = load_settings(yml, environ={"GOKIQ_API_TOKENS": "reader-1, reader-2"})
    clients = s.api_client_list
    assert len(clients) == 4
    billing, etl = clients.find(TOKEN_A), clients.find(TOKEN_B)
    assert (billing.name, billing.classes, billing.queues, billing.read) == (
        "billing", ("Billing::*",), ("default",), True,
    )  # fmt: skip
    assert billing.may_enqueue("Billing::Invoice") and not billing.may_enqueue("Other")
    assert (etl.rate, etl.bucket_size, etl.read, etl.classes) == (5.0, 20, False, ())
    assert etl.may_use_queue("low-priority") and not etl.may_use_queue("default")
    reader = clients.find("reader-2")
    assert (reader.name, reader.read, reader.classes) == ("token-2", True, ())
    assert clients.find("reader-3") is None and clients.find(None) is None
    assert TOKEN_A not in repr(s) and TOKEN_B not in repr(s)
    # The same clients from the environment (JSON), and a rate's default bucket.
    env = clients_env({"name": "etl", "token": TOKEN_A, "rate": 2.5})
    assert load_settings(environ=env).api_client_list.find(TOKEN_A).bucket_size == 3


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ('{"name": "etl"}', "api_clients: must be a list of clients, such as [{name: etl, "),
        ("[{name: etl", "api_clients: not valid YAML or JSON; expected [{name: etl, token: "),
        ([{"name": "etl", "token": "short-secret"}],
         "api_clients[0]: token must be at least 16 characters"),
        ([{"name": "etl"}], "api_clients[0]: name and token are required strings"),
        (["etl"], "api_clients[0]: must be a mapping with name and token"),
        ([{"name": "etl", "token": TOKEN_A, "queue": ["a"]}],
         "api_clients[0]: unknown field(s) queue (a client has burst, classes, name, queues, "
         "rate, read, token)"),
        ([{"name": "a", "token": TOKEN_B}, {"name": "etl", "token": TOKEN_A, "rate": 0}],
         "api_clients[1]: client etl: rate must be > 0 jobs/s, got 0.0"),
        ([{"name": "etl", "token": TOKEN_A, "rate": "fast"}],
         "api_clients[0]: rate must be a number and burst an integer"),
        ([{"name": "etl", "token": TOKEN_A, "burst": -1}],
         "api_clients[0]: client etl: burst must be >= 0, got -1"),
        ([{"name": "etl", "token": TOKEN_A, "read": "yes"}],
         "api_clients[0].read: must be true or false"),
        ([{"name": "etl", "token": TOKEN_A, "queues": [""]}],
         "api_clients[0].queues: must be a list of non-empty glob strings"),
        ([{"name": "etl", "token": TOKEN_A, "classes": {"HardJob": 1}}],
         "api_clients[0].classes: must be a list of non-empty glob strings"),
        ([{"name": "my etl", "token": TOKEN_A}],
         "api_clients[0]: client name 'my etl': 1-64 letters, digits, '_', '.', ':' or '-'"),
        ([{"name": "etl", "token": TOKEN_A + "\n"}],
         "api_clients[0]: client etl: token must be printable ASCII"),
        ([{"name": "etl", "token": TOKEN_A}, {"name": "etl", "token": TOKEN_B}],
         "api_clients: name(s) used twice: etl (across api_clients, api_clients_file and "
         "api_tokens, whose clients are token-1, token-2, ...): give each client a name of "
         "its own"),
        ([{"name": "etl", "token": TOKEN_A}, {"name": "bi", "token": TOKEN_A}],
         "api_clients: two clients share one token (across api_clients, api_clients_file and "
         "api_tokens): give each client a token of its own"),
    ],
)  # fmt: skip
def test_a_bad_client_names_the_key_the_entry_and_the_fix(clients, message):
    env = {"GOKIQ_API_CLIENTS": clients if isinstance(clients, str) else json.dumps(clients)}
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert str(info.value).startswith(message)
    assert "secret" not in str(info.value) and TOKEN_A not in str(info.value)


def test_a_reader_token_may_not_be_a_clients_too(tmp_path):
    env = {**clients_env({"name": "etl", "token": TOKEN_A}), "GOKIQ_API_TOKENS": TOKEN_A}
    with pytest.raises(ConfigError, match=r"^api_clients: two clients share one token"):
        load_settings(environ=env)


def test_a_bad_clients_file_names_the_file_and_the_entry(tmp_path):
    missing = tmp_path / "missing.yml"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"GOKIQ_API_CLIENTS_FILE": str(missing)})
    assert str(info.value) == f"api_clients_file {missing}: No such file or directory"
    path = tmp_path / "clients.yml"
    path.write_text(f"- name: etl\n  token: {TOKEN_A}\n  rate: -2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"GOKIQ_API_CLIENTS_FILE": str(path)})
    assert str(info.value) == (
        f"api_clients_file {path}[0]: client etl: rate must be > 0 jobs/s, got -2.0"
    )
    path.write_text("clients: []\n")
    with pytest.raises(ConfigError, match=rf"^api_clients_file {path}: must be a list of clients"):
        load_settings(environ={"GOKIQ_API_CLIENTS_FILE": str(path)})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GOKIQ_API_CLIENTS": '[{"name": "etl", "token": "short-secret"}]'},
         "api_clients[0]: token must be at least 16 characters"),
        ({}, "api_clients or api_tokens: gokiq-api needs at least one client "
             "(GOKIQ_API_CLIENTS, api_clients_file or GOKIQ_API_TOKENS)"),
        ({"GOKIQ_API_IDEMPOTENCY_TTL": "0"}, "api_idempotency_ttl: must be > 0, got 0.0"),
    ],
)  # fmt: skip
def test_gokiq_api_refuses_to_start_on_a_bad_client_setting(tmp_path, env, message):
    """`gokiq-api` stops with one line naming the key, not a traceback."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOKIQ_")}
    history = {"GOKIQ_HISTORY_URL": f"sqlite:///{tmp_path / 'h.sqlite3'}"}
    stderr = refused_start(["gokiq-api"], {**base, **history, **env}, tmp_path)
    assert stderr == f"gokiq-api: bad setting: {message}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan"])
def test_a_history_retention_that_is_not_a_finite_duration_is_refused(value):
    """The fuzz test's find: NaN compares false with 0, so `<= 0` alone let it through."""
    with pytest.raises(ConfigError, match="history_retention"):
        load_settings(environ={}, history_retention=value)


def test_an_infinite_number_for_a_whole_number_setting_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, history_buffer=float("inf"))
    assert str(info.value).startswith("history_buffer: expected int")


def test_worker_prefetch_multiplier_reaches_celery():
    """Two messages per slot by default (the next one is at hand when a job ends), 1 when set,
    and never 0 (Celery reads 0 as no limit)."""
    from celeryconfig import celery_config

    assert celery_config(load_settings(environ={}))["worker_prefetch_multiplier"] == 2
    env = {"GOKIQ_WORKER_PREFETCH_MULTIPLIER": "1"}
    assert celery_config(load_settings(environ=env))["worker_prefetch_multiplier"] == 1
    with pytest.raises(ConfigError, match="worker_prefetch_multiplier"):
        load_settings(environ={"GOKIQ_WORKER_PREFETCH_MULTIPLIER": "0"})
