"""Generated payloads through the real stack: redis -> gokiq-bridge -> Celery worker -> the real
Ruby sidecar on the example app (tests/e2e/conftest.py's Stack), then every payload accounted for.

    .venv/bin/python bench/fuzz.py [--n 100000] [--seed 1]

The mix (each payload unique, so its fate can be found):
- valid: NoopJob with random JSON arguments and extra fields (kept byte for byte) -> run;
- unknown: a class the app does not have or may not run (no `retry` field) -> dropped, as
  Sidekiq drops a job whose class is missing (README, How retries map);
- garbage the bridge refuses (random bytes, broken or non-object JSON, NaN, nesting past 100,
  retry_count not a count, a lone-surrogate retry_queue, no class, args not an array) -> dead;
- payloads only Ruby refuses (a lone surrogate inside args: the sidecar answers 400) -> dead.

It waits until no job is queued, held, in the broker or in the delivery ledger, then prints the
counts per fate and checks: 0 crashed processes, every payload run, dead or dropped by the rules,
nothing run that should not have been. Exit status 1 if not. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gokiq_celery.sidekiq.job import dumps  # noqa: E402
from gokiq_celery.sidekiq.keys import queue_key  # noqa: E402
from gokiq_celery.sidekiq.store import SidekiqStore  # noqa: E402
from tests.e2e.conftest import Stack  # noqa: E402

UNKNOWN_CLASSES = [
    "Fuzz::Unknown", "Kernel", "File", "Person", "ActiveRecord::Base", "GreetJob", "notAClass",
    "Sidekiq::Extensions::DelayedClass", "ActiveRecord::DestroyAssociationAsyncJob", "Hard Job",
]  # fmt: skip


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    def jid(self) -> str:
        self.n += 1
        return f"fz{self.n:022x}"

    def value(self, depth: int = 0):
        r = self.rng.random()
        if depth > 3 or r < 0.5:
            return self.rng.choice(
                [None, True, False, self.rng.randint(-(2**63), 2**63), self.rng.random() * 1e6,
                 "".join(chr(self.rng.randint(32, 0x2FFF)) for _ in range(self.rng.randint(0, 8))),
                 "é\u2603", ""]
            )  # fmt: skip
        if r < 0.75:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {f"k{i}": self.value(depth + 1) for i in range(self.rng.randint(0, 3))}

    def base(self, cls: str) -> dict:
        args = [self.value() for _ in range(self.rng.randint(0, 3))]
        now = time.time()
        fields = {"class": cls, "args": args, "jid": self.jid(), "queue": "default"}
        return {**fields, "created_at": now, "enqueued_at": now, f"x_{self.n % 7}": self.value()}

    def valid(self) -> tuple[str, bytes]:
        fields = self.base("NoopJob")
        fields["retry"] = self.rng.choice([True, 3, 0, False])
        return "run", dumps(fields).encode()

    def unknown(self) -> tuple[str, bytes]:
        cls = self.rng.choice(UNKNOWN_CLASSES) + ("" if self.rng.random() < 0.5 else str(self.n))
        return "dropped", dumps(self.base(cls)).encode()

    def garbage(self) -> tuple[str, bytes]:
        fields = self.base("NoopJob")
        text = dumps(fields)
        kind = self.rng.randrange(9)
        if kind == 0:
            raw = f"garbage-{self.jid()}-".encode() + self.rng.randbytes(self.rng.randint(0, 64))
        elif kind == 1:
            raw = text[: self.rng.randint(1, len(text) - 1)].encode() + self.jid().encode()
        elif kind == 2:
            raw = f'[1,"{self.jid()}"]'.encode()
        elif kind == 3:
            raw = (text[:-1] + ',"retry_count":NaN}').encode()
        elif kind == 4:
            depth = self.rng.choice([101, 500, 1000, 5000])
            raw = (text[:-1] + ',"deep":' + "[" * depth + "]" * depth + "}").encode()
        elif kind == 5:
            raw = text[:-1] + ',"retry_count":' + dumps(self.rng.choice(["abc", -1, 1.5])) + "}"
            raw = raw.encode()
        elif kind == 6:
            raw = (text[:-1] + ',"retry_queue":"\\ud800"}').encode()
        elif kind == 7:
            del fields["class"]
            raw = dumps(fields).encode()
        else:
            fields["args"] = {"not": "an array"}
            raw = dumps(fields).encode()
        return "dead", raw

    def ruby_only(self) -> tuple[str, bytes]:
        text = dumps({**self.base("NoopJob"), "retry": True})  # a 400 kills it: dead set
        return "dead", text.replace('"args":[', '"args":["\\ud800",', 1).encode()

    def payloads(self, n: int) -> list[tuple[str, bytes]]:
        makers = [self.valid] * 10 + [self.unknown] * 4 + [self.garbage] * 5 + [self.ruby_only]
        return [self.rng.choice(makers)() for _ in range(n)]


def key_of(raw: bytes) -> str | bytes:
    """How a payload is found again: its jid when it has one, else its bytes."""
    try:
        fields = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    jid = fields.get("jid") if isinstance(fields, dict) else None
    return jid if isinstance(jid, str) else raw


def push(stack: Stack, payloads: list[tuple[str, bytes]]) -> None:
    r = stack.sidekiq_redis
    r.sadd("queues", "default")
    for i in range(0, len(payloads), 1000):
        r.lpush(queue_key("default"), *(raw for _, raw in payloads[i : i + 1000]))


def settled(stack: Stack, store: SidekiqStore) -> bool:
    held = store.redis.zcard("retry") + store.redis.zcard("schedule")
    return stack.idle() and not store.ledger.tokens() and not held


def wait_settled(stack: Stack, store: SidekiqStore, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        if any(not s.alive() for s in stack.services):
            return
        if settled(stack, store):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 3:
                return
        else:
            quiet_since = None
        time.sleep(1)
    print(f"not settled after {timeout:.0f}s", flush=True)


def account(stack: Stack, store: SidekiqStore, payloads: list[tuple[str, bytes]]) -> Counter:
    ran = Counter(
        line["jid"] for line in stack.sidecar_done() if line.get("outcome") in ("ok", "failed")
    )
    refused = {line["jid"] for line in stack.sidecar_done() if line["outcome"] == "invalid_class"}
    dead = {key_of(member) for member, _ in store.dead.entries()}
    counts: Counter = Counter()
    for expected, raw in payloads:
        key = key_of(raw)
        if key in dead:
            fate = "dead"
        elif ran[key]:
            fate = "run" if ran[key] == 1 else "run more than once"
        elif key in refused:
            fate = "dropped"
        else:
            fate = "unaccounted"
        counts[(expected, fate)] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="payloads (default 100,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for all")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    opts = parser.parse_args()

    payloads = Generator(opts.seed).payloads(opts.n)
    tmp = Path(tempfile.mkdtemp(prefix="gokiq-fuzz-"))
    # Sidekiq trims the dead set at 10,000 by default: keep every entry to count it.
    stack = Stack(tmp, {"GOKIQ_DEAD_MAX_JOBS": str(2 * opts.n)})
    try:
        print(f"starting redis, sidecar, bridge, worker (logs in {tmp}/logs) ...", flush=True)
        stack.start()
        store = SidekiqStore(stack.sidekiq_redis)
        started = time.monotonic()
        push(stack, payloads)
        print(f"pushed {len(payloads)} payloads; waiting for every one ...", flush=True)
        wait_settled(stack, store, opts.timeout)
        crashed = [s.name for s in stack.services if not s.alive()]
        counts = account(stack, store, payloads)
        elapsed = time.monotonic() - started
        print(f"done in {elapsed:.0f}s; crashed processes: {len(crashed)} {crashed}")
        for (expected, fate), n in sorted(counts.items()):
            print(f"  expected {expected:<8} -> {fate:<20} {n:>7}")
        wrong = {k: n for k, n in counts.items() if k[0] != k[1]}
        print(f"payloads: {len(payloads)}, as the rules say: {len(payloads) - sum(wrong.values())}")
        return 1 if crashed or wrong else 0
    finally:
        stack.stop()
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
