"""Each Celery worker shows on Sidekiq's Busy page as a Sidekiq process, with the jobs it runs.

The Web UI, `Sidekiq::ProcessSet` and `Sidekiq::WorkSet` read a registry that every Sidekiq
process refreshes on a heartbeat (docs/sidekiq-protocol.md §2.5; the data: sidekiq/processes.py).
A worker keeps its entry the same way, from its main process, where Celery tracks the requests
running in any pool. Its signals work too: Quiet (TSTP) stops consuming, Stop (TERM) is Celery's
warm shutdown, TTIN logs every thread's stack.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.worker import state

from .messages import TASK_NAME
from .settings import Settings
from .sidekiq.store import SidekiqStore
from .sidekiq.version import SidekiqVersion, SidekiqVersionResolver, SidekiqVersionUnknown
from .worker import current_worker

log = logging.getLogger("gokiq.worker")


@dataclass
class SidekiqProcess:
    """This worker as one Sidekiq process: its identity, its `info`, and one beat at a time."""

    settings: Settings
    store: SidekiqStore
    concurrency: int
    queues: list[str]
    label: str  # the Celery node name, shown as a label beside the process
    hostname: str = field(default_factory=lambda: os.environ.get("DYNO") or socket.gethostname())
    quiet: bool = False
    versions: SidekiqVersionResolver | None = None  # None: from settings and store

    def __post_init__(self) -> None:
        self.identity = f"{self.hostname}:{os.getpid()}:{secrets.token_hex(6)}"
        self.started_at = time.time()
        if self.versions is None:
            self.versions = self.store.versions(self.settings.sidekiq_version)
        self.version: SidekiqVersion | None = None  # what the last beat was written for
        self.waiting_logged = False

    def _info(self, version: SidekiqVersion) -> str:
        info: dict[str, Any] = {
            "hostname": self.hostname,
            "started_at": self.started_at,
            "pid": os.getpid(),
            "tag": "gokiq",
            "concurrency": self.concurrency,
            "queues": list(dict.fromkeys(self.queues)),
            "labels": [self.label],
            "identity": self.identity,
        }
        if version.major >= 7:
            weights = {spec.name: spec.weight for spec in self.settings.queues}
            info["weights"] = [{queue: weights.get(queue, 0) for queue in info["queues"]}]
            info["embedded"] = False
            info["version"] = _version()  # shown as is where it differs from the page's own
        return json.dumps(info, separators=(",", ":"))

    def beat(self, running: list[Any]) -> str | None:
        """Write this beat (`running`: Celery requests of gokiq.perform); returns a signal.

        Nothing is written until the app's Sidekiq version is known: the Busy page's names and
        fields depend on it."""
        version = self.versions.current()
        if version is None:
            if not self.waiting_logged:
                self.waiting_logged = True
                log.warning("not on Sidekiq's Busy page yet: %s", SidekiqVersionUnknown())
            return None
        if version != self.version:  # the first beat, or the app changed Sidekiq version
            self.leave()
            self.version, self.info = version, self._info(version)
        work = {_tid(request): _work_entry(request) for request in running}
        fields: dict[str, str | int | float] = {
            "info": self.info,
            "busy": len(work),
            "beat": time.time(),
            "quiet": "true" if self.quiet else "false",
            "rss": _rss_kb(),
            "rtt_us": self.store.processes.round_trip_us(),
        }
        if version.major >= 8:
            fields["concurrency"] = self.concurrency  # 8.1.2+ reads it here, no longer in info
        return self.store.processes.beat(self.identity, fields, work, version)

    def leave(self) -> None:
        if self.version is not None:  # else never on the page
            self.store.processes.unregister(self.identity, self.version)


class SidekiqHeartbeat(bootsteps.StartStopStep):
    """A consumer bootstep: beats every `sidekiq_heartbeat` seconds from a thread of its own,
    across broker reconnections, and leaves the registry when the worker shuts down."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.process: SidekiqProcess | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, c) -> None:
        if self.thread is not None:
            return  # a restart after a broker reconnection: the beat never stopped
        worker = current_worker()  # this process's settings and Redis (tests install their own)
        if not worker.settings.sidekiq_heartbeat:
            return
        consumed = {queue.name for queue in c.task_consumer.queues}
        # Shown under their Sidekiq names, as the app knows them.
        queues = [
            q.name
            for q in worker.settings.queues
            if worker.settings.celery_queue(q.name) in consumed
        ]
        self.process = SidekiqProcess(
            worker.settings,
            worker.store,
            c.controller.concurrency,
            queues or sorted(consumed),
            c.hostname,
            versions=worker.versions,
        )
        self.thread = threading.Thread(
            target=self._run, args=(c,), name="gokiq-sidekiq-heartbeat", daemon=True
        )
        self.thread.start()
        log.info("on Sidekiq's Busy page as %s", self.process.identity)

    def shutdown(self, c) -> None:
        if self.thread is None:
            return
        self.stopping.set()
        self.thread.join(timeout=5)
        try:
            self.process.leave()
        except Exception as exc:  # the entry expires on its own within a minute
            log.warning("could not leave Sidekiq's process registry: %s", exc)

    def _run(self, c) -> None:
        interval = self.process.settings.sidekiq_heartbeat
        while True:
            try:
                received = self.process.beat(_running_jobs())
            except Exception as exc:  # Redis down: Sidekiq's heartbeat carries on the same way
                log.warning("Sidekiq heartbeat failed: %s: %s", type(exc).__name__, exc)
            else:
                if received:
                    self._on_signal(c, received)
            if self.stopping.wait(interval):
                return

    def _on_signal(self, c, name: str) -> None:
        log.warning("received %s from Sidekiq's process registry", name)
        if name == "TSTP":
            c.call_soon(self._quiet, c)  # the consumer's own loop owns its queues
        elif name == "TERM":
            os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: running jobs finish
        elif name == "TTIN":
            log_thread_stacks()

    def _quiet(self, c) -> None:
        for queue in [queue.name for queue in c.task_consumer.queues]:
            c.cancel_task_queue(queue)
        self.process.quiet = True  # "stopping" on the page from the next beat: nothing new runs


def log_thread_stacks() -> None:
    """Sidekiq's TTIN: every thread's stack in the log, to see where a stuck worker waits."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        log.warning("thread %s:\n%s", names.get(ident, ident), stack)


def _version() -> str:
    try:
        return f"gokiq {importlib.metadata.version('gokiq')}"
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "gokiq"


def _running_jobs() -> list[Any]:
    # Pool threads add and remove requests while we read; a copy retried is enough here.
    for _ in range(10):
        try:
            return [r for r in list(state.active_requests) if r.task.name == TASK_NAME]
        except RuntimeError:  # the set changed size during the copy
            continue
    return []


def _tid(request: Any) -> str:
    """A unique id per running job, in Sidekiq's form (base 36); Celery has no thread to name."""
    return _base36(id(request) ^ os.getpid())


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if not number:
            return text


def _work_entry(request: Any) -> str:
    payload, queue = request.args[:2]
    run_at = int(request.time_start or time.time())
    return json.dumps({"queue": queue, "payload": payload, "run_at": run_at}, separators=(",", ":"))


def _rss_kb() -> int:
    """This process's RSS plus its children's (prefork's pool), in KB, as Sidekiq reports RSS."""
    pids = [str(os.getpid())]
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids += children.read_text().split()
        except OSError:
            continue
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone (a child that exited), or not Linux
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total
