"""The whole gokiq stack as real processes, for end-to-end tests.

`stack` (one per test module) starts, each as its own subprocess with its log in a file:
a redis-server on a free port (Sidekiq's data in db 0, the Celery broker in db 1), the Ruby
sidecar on the example Rails app (its own sqlite file), `gokiq-bridge` and
`celery -A gokiq_celery worker --concurrency=20` (at its default log level, INFO). Tests
enqueue with the app's real Sidekiq client and read Sidekiq's own API through
`tests/e2e/sidekiq_api.rb` (`stack.api(...)`), and check outcomes in the app's database. A
module may set `STACK_ENV = {...}` to add settings. On a failing test the tail of every
process's log is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from ..conftest import REPO, VENV_BIN, RedisServer, free_port, start_redis, wait_for

EXAMPLE_APP = REPO / "rails_sidecar" / "example_app"
SIDECAR_BIN = REPO / "rails_sidecar" / "bin" / "gokiq-sidecar"
API_RB = Path(__file__).with_name("sidekiq_api.rb")
QUEUES = ("default", "critical", "low")


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def sidekiq_api(env: dict[str, str], *ops: dict[str, Any], timeout: float = 180) -> list[Any]:
    """Run operations in one Ruby process (see sidekiq_api.rb) against the Redis in `env`."""
    done = subprocess.run(
        ["ruby", str(API_RB)],
        input=json.dumps(list(ops)),
        capture_output=True,
        text=True,
        env={**env, "RAILS_ROOT": str(EXAMPLE_APP)},
        cwd=EXAMPLE_APP,
        timeout=timeout,
    )
    for line in done.stdout.splitlines():
        if line.startswith("GOKIQ_RESULT "):
            return json.loads(line[len("GOKIQ_RESULT ") :])
    raise AssertionError(f"sidekiq_api.rb failed ({done.returncode}):\n{done.stderr[-4000:]}")


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)


def rabbitmq_missing() -> str | None:
    """None when a RabbitMQ answers on 127.0.0.1:5672 and `rabbitmqctl` can make a private
    vhost there, else why not."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        return "no RabbitMQ on 127.0.0.1:5672"
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl not installed (needed to create a private vhost)"
    return None


class Service:
    """One process of the stack: start, SIGKILL, stop, restart; output appended to `log`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        ready: Callable[[], bool],
        cwd: Path = REPO,
        ready_timeout: float = 60.0,
    ) -> None:
        self.name, self.argv, self.env, self.log, self.cwd = name, argv, env, log, cwd
        self.ready, self.ready_timeout = ready, ready_timeout
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> Service:
        assert not self.alive(), f"{self.name} is already running"
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(
                f"\n===== start #{self.starts} of {self.name} at {time.time():.3f}\n".encode()
            )
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of pytest does not hit it first
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        def check() -> bool:
            if not self.alive():
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            return self.ready()

        wait_for(check, timeout=self.ready_timeout, interval=0.1, message=f"{self.name} not ready")

    def kill9(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no cleanup of any kind."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def kill9_group(self) -> None:
        """SIGKILL the process and every child of it (prefork's pool, anything it started)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)  # start_new_session: its own group
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL after `timeout`."""
        if not self.alive():
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def restart(self) -> Service:
        self.stop()
        return self.start()

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def json_lines(self) -> list[dict[str, Any]]:
        """The process's JSON log lines (other output skipped)."""
        out = []
        for line in self.lines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines()[-n:])

    def peak_rss_kb(self) -> int:
        """VmHWM of the running process, in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0


class Stack:
    """`bin_dir`: where `gokiq-bridge` and `celery` come from; `workdir`: their working
    directory (another venv's, run outside the source tree, imports only what it installed)."""

    def __init__(
        self,
        tmp: Path,
        extra_env: dict[str, str] | None = None,
        bin_dir: Path = VENV_BIN,
        workdir: Path = REPO,
        redis_args: Iterable[str] = (),
    ) -> None:
        self.tmp = tmp
        self.redis_args = tuple(redis_args)
        self.redis: RedisServer = start_redis(tmp / "redis", None, *self.redis_args)
        self.redis_url = self.redis.url(0)
        self.broker_url = self.redis.url(1)
        self.db_path = tmp / "example.sqlite3"
        self.token = secrets.token_hex(16)
        self.sidecar_port = free_port()
        self.bridge_port = free_port()
        self.worker_port = free_port()
        self.sidecar_url = f"http://127.0.0.1:{self.sidecar_port}"
        self.bridge_url = f"http://127.0.0.1:{self.bridge_port}"
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"

        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GOKIQ_") and k not in {"REDIS_URL", "CELERY_BROKER_URL"}
        }
        self.env = {
            **base,
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.broker_url,
            "GOKIQ_SIDECAR_URL": self.sidecar_url,
            "GOKIQ_SIDECAR_TOKEN": self.token,
            "GOKIQ_QUEUES": " ".join(QUEUES),
            "GOKIQ_WORKER_METRICS_PORT": str(self.worker_port),
            "GOKIQ_BRIDGE_METRICS_PORT": str(self.bridge_port),
            "GOKIQ_EXAMPLE_DB": str(self.db_path),
            "GOKIQ_LOG_FORMAT": "json",
            # Short enough that a job held by a SIGKILLed worker is published again within the
            # tests' patience (the delivery ledger's deadline is job_timeout + 12 s).
            "GOKIQ_JOB_TIMEOUT": "15",
            "GOKIQ_DELIVERY_TIMEOUT": "20",
            **(extra_env or {}),
        }
        logs = tmp / "logs"
        logs.mkdir(exist_ok=True)
        self.sidecar = Service(
            "sidecar",
            ["ruby", str(SIDECAR_BIN), "--port", str(self.sidecar_port), "--threads", "5:20"],
            self.env,
            logs / "sidecar.log",
            lambda: _http_ok(self.sidecar_url + "/ready"),
            cwd=EXAMPLE_APP,
        )
        self.bridge = Service(
            "bridge",
            [str(bin_dir / "gokiq-bridge")],
            self.env,
            logs / "bridge.log",
            lambda: _http_ok(self.bridge_url + "/ready"),
            cwd=workdir,
        )
        self.worker = Service(
            "worker",
            [
                str(bin_dir / "celery"),
                "-A",
                "gokiq_celery",
                "worker",
                "--concurrency=20",
                "-Q",
                ",".join(QUEUES),
                "-n",
                f"e2e-{self.worker_port}@%h",
            ],
            self.env,
            logs / "worker.log",
            lambda: _http_ok(self.worker_url + "/metrics"),
            cwd=workdir,
        )
        self.services = [self.sidecar, self.bridge, self.worker]  # + add_service's, in order

    def start(self) -> Stack:
        # The sidecar first: its boot creates the app's schema in the fresh sqlite file.
        for service in self.services:
            service.start()
        return self

    def stop(self) -> None:
        for service in (*self.services[3:], self.bridge, self.worker, self.sidecar):
            service.stop()
        self.redis.process.terminate()
        self.redis.process.wait(10)

    # -- more processes: a second sidecar or bridge, a Ruby Sidekiq beside gokiq -------------

    def add_service(
        self,
        name: str,
        argv: list[str],
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> Service:
        """One more process (not started), stopped and logged with the stack's own."""
        log = self.tmp / "logs" / f"{name}.log"
        service = Service(name, argv, {**self.env, **(env or {})}, log, ready, cwd=cwd)
        self.services.append(service)
        return service

    def add_sidecar(self, name: str, *args: str) -> Service:
        """Another sidecar on the app (its own port; the workers call the first one)."""
        url = f"http://127.0.0.1:{free_port()}"
        argv = ["ruby", str(SIDECAR_BIN), "--port", url.rsplit(":", 1)[1], *args]
        return self.add_service(name, argv, lambda: _http_ok(url + "/ready"), cwd=EXAMPLE_APP)

    def add_bridge(self, name: str) -> Service:
        url = f"http://127.0.0.1:{free_port()}"
        env = {"GOKIQ_BRIDGE_METRICS_PORT": url.rsplit(":", 1)[1]}
        argv = [str(VENV_BIN / "gokiq-bridge")]
        return self.add_service(name, argv, lambda: _http_ok(url + "/ready"), env=env)

    def add_ruby_sidekiq(self, name: str, *args: str) -> Service:
        """A Ruby `sidekiq` process on the example app, as during a migration; ready once its
        launcher's first heartbeat lists it (identity `host:pid:...`) in `processes`."""
        service: Service

        def listed() -> bool:
            identities = self.sidekiq_redis.smembers("processes")
            return any(f":{service.pid}:".encode() in identity for identity in identities)

        service = self.add_service(name, ["sidekiq", *args], listed, cwd=EXAMPLE_APP)
        return service

    def restart_redis(self, down: float) -> float:
        """SIGTERM redis-server (it writes its AOF and exits, as a restart does), keep it down
        `down` seconds, start it on the same port and data. Returns when it answers again."""
        self.redis.process.terminate()
        self.redis.process.wait(30)
        time.sleep(down)
        self.redis = start_redis(self.redis.dir, self.redis.port, *self.redis_args)
        return time.time()

    # -- the app's side: real Sidekiq client, Sidekiq's API, the app's database ------------

    def api(self, *ops: dict[str, Any], timeout: float = 180) -> list[Any]:
        """Run operations in one Ruby process (see sidekiq_api.rb); their results, in order."""
        return sidekiq_api(self.env, *ops, timeout=timeout)

    def api1(self, op: dict[str, Any]) -> Any:
        return self.api(op)[0]

    def job_runs(self, job_class: str | None = None, jids: Iterable[str] | None = None) -> list:
        op: dict[str, Any] = {"op": "job_runs"}
        if job_class:
            op["job_class"] = job_class
        if jids is not None:
            op["jids"] = list(jids)
        return self.api1(op)

    def wait_runs(
        self, jids: Iterable[str], job_class: str | None = None, timeout: float = 60
    ) -> list[dict[str, Any]]:
        """Wait until every jid has at least one JobRun row; return the rows."""
        wanted = set(jids)
        rows: list[dict[str, Any]] = []

        def all_ran() -> bool:
            nonlocal rows
            rows = self.job_runs(job_class, wanted)
            return wanted <= {r["jid"] for r in rows}

        wait_for(all_ran, timeout=timeout, interval=1.0, message=f"jobs did not all run: {rows}")
        return rows

    @property
    def sidekiq_redis(self) -> redis.Redis:
        return self.redis.client(0)

    @property
    def broker_redis(self) -> redis.Redis:
        return self.redis.client(1)

    def push_raw(self, queue: str, raw: str | bytes) -> None:
        """What a buggy producer does: any bytes onto a Sidekiq queue (SADD + LPUSH)."""
        r = self.sidekiq_redis
        r.sadd("queues", queue)
        r.lpush(f"queue:{queue}", raw)

    def metrics(self, url: str) -> str:
        return requests.get(url + "/metrics", timeout=5).text

    def sidecar_done(self) -> list[dict[str, Any]]:
        """The sidecar's per-job log lines ("job done")."""
        return [line for line in self.sidecar.json_lines() if line.get("msg") == "job done"]

    def idle(self) -> bool:
        """No job waiting in a Sidekiq queue, held by a bridge, or in the broker."""
        r, b = self.sidekiq_redis, self.broker_redis
        if any(r.llen(f"queue:{q}") for q in QUEUES):
            return False
        if any(r.llen(k) for k in r.scan_iter("gokiq:inflight:*")):
            return False
        if any(r.llen(k) for k in r.scan_iter("gokiq:moving:*")):
            return False
        return not any(b.llen(q) for q in QUEUES) and not b.hlen("unacked")


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@contextlib.contextmanager
def running(s: Stack) -> Iterator[Stack]:
    """Start the stack; if anything fails, print every process's log; always stop it."""
    try:
        s.start()
        yield s
    except BaseException:
        _print_logs(s)
        raise
    finally:
        s.stop()


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Iterator[Stack]:
    extra = getattr(request.module, "STACK_ENV", {})
    redis_args = getattr(request.module, "REDIS_ARGS", ())
    with running(Stack(tmp_path_factory.mktemp("stack"), extra, redis_args=redis_args)) as s:
        yield s


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def _logs_on_failure(request) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "stack" in request.fixturenames:
        _print_logs(request.getfixturevalue("stack"))


def _print_logs(s: Stack) -> None:
    for service in s.services:
        print(f"\n----- {service.name} ({service.log}), last lines -----\n{service.tail(80)}")
