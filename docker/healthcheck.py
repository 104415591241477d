#!/usr/bin/env python3
"""Container health check for gokiq's Python image (installed as `gokiq-healthcheck`).

    gokiq-healthcheck URL   GET URL; healthy on a 2xx answer
    gokiq-healthcheck       find out what PID 1 runs and check that:
                              gokiq-bridge         GET :$GOKIQ_BRIDGE_METRICS_PORT/health (9478)
                              celery ... flower    GET :<--port or $FLOWER_PORT>/healthcheck (5555)
                              celery ... worker    celery inspect ping -d celery@$HOSTNAME

Exit 0 healthy, 1 unhealthy (Docker's HEALTHCHECK convention). Standard library only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

TIMEOUT = float(os.environ.get("GOKIQ_HEALTHCHECK_TIMEOUT", "5"))


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return 200 <= resp.status < 300
    except OSError as exc:  # URLError, HTTPError (non-2xx), timeouts
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return False


def option(argv: list[str], name: str) -> str | None:
    """Value of `--name=value` or `--name value` in argv."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def pid1_argv() -> list[str]:
    raw = Path("/proc/1/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def check(argv: list[str]) -> bool:
    names = [os.path.basename(a) for a in argv]
    if "gokiq-bridge" in names or "bridge.cli" in argv:
        port = os.environ.get("GOKIQ_BRIDGE_METRICS_PORT") or "9478"
        return http_ok(f"http://127.0.0.1:{port}/health")
    if "flower" in argv:
        port = option(argv, "--port") or os.environ.get("FLOWER_PORT") or "5555"
        return http_ok(f"http://127.0.0.1:{port}/healthcheck")
    if "worker" in argv:
        node = option(argv, "-n") or option(argv, "--hostname") or "celery@%h"
        node = node.replace("%h", socket.gethostname()).replace("%n", socket.gethostname())
        app = option(argv, "-A") or option(argv, "--app") or "gokiq_celery"
        cmd = ["celery", "-A", app, "inspect", "ping", "--timeout", str(TIMEOUT), "-d", node]
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False).returncode == 0
    print(f"unhealthy: do not know how to check {' '.join(argv)!r}", file=sys.stderr)
    return False


def main() -> int:
    if len(sys.argv) > 1:
        return 0 if http_ok(sys.argv[1]) else 1
    return 0 if check(pid1_argv()) else 1


if __name__ == "__main__":
    sys.exit(main())
