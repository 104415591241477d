"""A/B of the worker's Redis transport: two source trees, the same jobs, alternating rounds.

    .venv/bin/python bench/redis_pop.py --before /work/wt/main-tree [--rounds 4] [--n 3000]
        [--profile DIR]

Each round runs a fresh threads-pool worker (concurrency 20, bench/worker.py's run) from each
tree, which one first alternating between rounds, on no-op jobs and on jobs sleeping 20 ms in
the stand-in sidecar, through a Redis broker. It prints jobs/s and the worker's CPU per job for
each, and the after/before ratios of each round and their median. With --profile, py-spy
(--gil) samples the worker during each measured run and the folded stacks go to DIR, one file
per tree, workload and round (summarise them with `--shares DIR`). Nothing here asserts; it
measures. Report the load average with the figures: only ratios from the same run count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.worker import RunFailed, free_port, run_one, start_redis  # noqa: E402
from gokiq_celery.messages import TASK_NAME  # noqa: E402

WORKLOADS = {"noop": ("OkJob", None), "20ms": ("SlowJob", [0.02])}

# What a GIL sample is spent on, by the first of these frames found in its stack (the
# innermost first). The names are kombu's and gokiq's own functions.
SHARES = [
    ("unacked record write (QoS.append)", "append ("),
    ("BRPOP re-arm (_brpop_start)", "_brpop_start"),
    ("BRPOP reply (_brpop_read)", "_brpop_read"),
    ("acks flush", "flush_acks"),
]


def shares(path: Path) -> tuple[int, Counter[str]]:
    """(samples, {item: samples}) of a py-spy raw (folded) file of the worker's GIL holder."""
    total, found = 0, Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        for name, frame in SHARES:
            if frame in stack:
                found[name] += n
                break
        if "hub.py" in stack or "asynloop" in stack:
            found["event loop (all)"] += n
    return total, found


def print_shares(directory: Path) -> None:
    for path in sorted(directory.glob("*.txt")):
        total, found = shares(path)
        items = ", ".join(f"{name} {100 * n / total:.1f}%" for name, n in found.most_common())
        print(f"{path.name}: {total} samples; {items}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the tree to compare against (e.g. main's)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--n", type=int, default=3000, help="no-op jobs a run (20 ms: a third)")
    parser.add_argument("--workloads", default="noop,20ms")
    parser.add_argument("--profile", type=Path, help="a directory for py-spy's folded stacks")
    parser.add_argument("--shares", type=Path, help="only summarise a --profile directory")
    args = parser.parse_args()
    if args.shares:
        print_shares(args.shares)
        return
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    trees = {"before": args.before.resolve(), "after": REPO}
    server = start_redis(Path(tempfile.mkdtemp(prefix="gokiq-bench-")))
    port = free_port()
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "tests.stand_in_sidecar", "--port", str(port)], cwd=REPO
    )
    sidecar.url = f"http://127.0.0.1:{port}"
    ratios: dict[str, dict[str, list[float]]] = {
        w: {"rate": [], "cpu": []} for w in args.workloads.split(",")
    }
    try:
        time.sleep(0.5)
        print(f"load average at start: {os.getloadavg()}", flush=True)
        for r in range(args.rounds):
            for workload in ratios:
                n = args.n if workload == "noop" else args.n // 3
                runs = {}
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for side in order:
                    out = None
                    if args.profile:
                        out = args.profile / f"{side}-{workload}-{r}.txt"
                    try:
                        run = run_one(
                            "threads", TASK_NAME, n, server, sidecar,
                            repo=trees[side], job=WORKLOADS[workload], profile=out,
                        )  # fmt: skip
                    except RunFailed as failed:
                        print(f"round {r} {workload} {side}: FAILED {failed}", flush=True)
                        continue
                    runs[side] = run
                    print(f"round {r} {workload:5} {side:6} {run.rate:7.0f} jobs/s  worker "
                          f"{1e6 * run.cpu['worker']:5.0f} µs/job  redis "
                          f"{1e6 * run.cpu['redis']:4.0f} µs/job  BRPOP/job {run.brpops:.2f}  "
                          f"load {os.getloadavg()[0]:.2f}",
                          flush=True)  # fmt: skip
                if len(runs) == 2:
                    rate = runs["after"].rate / runs["before"].rate
                    cpu = runs["after"].cpu["worker"] / runs["before"].cpu["worker"]
                    ratios[workload]["rate"].append(rate)
                    ratios[workload]["cpu"].append(cpu)
                    print(f"round {r} {workload:5} after/before: jobs/s {rate:.2f}x, worker CPU "
                          f"per job {cpu:.2f}x", flush=True)  # fmt: skip
        for workload, got in ratios.items():
            for what, values in got.items():
                if values:
                    median = sorted(values)[len(values) // 2]
                    each = ", ".join(f"{v:.2f}" for v in values)
                    label = "jobs/s" if what == "rate" else "worker CPU per job"
                    print(f"{workload}: after/before {label} median {median:.2f}x ({each})")
        print(f"load average at end: {os.getloadavg()}", flush=True)
        if args.profile:
            print_shares(args.profile)
    finally:
        sidecar.terminate()
        server.process.terminate()


if __name__ == "__main__":
    main()
