"""gokiq's Celery app plus one task that makes no HTTP call, for bench/worker.py."""

from gokiq_celery import app

app.conf.include = [*app.conf.include]


@app.task(name="bench.noop")
def noop(payload: str, queue: str) -> None:
    """Same arguments as gokiq.perform, no sidecar call: the ceiling of the worker itself."""
