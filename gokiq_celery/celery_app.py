"""The Celery app: configured from `celeryconfig.py`, with gokiq's tasks registered."""

import logging

from celery import Celery
from celery.signals import setup_logging as celery_setup_logging
from celery.signals import worker_ready

from .heartbeat import SidekiqHeartbeat
from .logs import setup_logging
from .settings import ConfigError, process_settings

# Until someone configures logging, gokiq's format is the default: Flower (tornado) then adds
# no handler of its own, so `celery -A gokiq_celery flower` logs JSON lines like the rest.
if not logging.getLogger().handlers:
    try:
        _settings = process_settings()
    except ConfigError:
        pass  # celeryconfig reports it, in one line, and stops
    else:
        setup_logging(_settings.log_level, _settings.log_format)

app = Celery("gokiq")
app.config_from_object("celeryconfig")
app.conf.include = ["gokiq_celery.tasks", "gokiq_celery.enqueue"]
app.steps["consumer"].add(SidekiqHeartbeat)


@celery_setup_logging.connect
def _json_logging(loglevel=None, **_kwargs) -> None:
    """Celery's worker logs in gokiq's format (JSON lines by default) instead of its own."""
    settings = process_settings()
    setup_logging(loglevel or settings.log_level, settings.log_format)


@worker_ready.connect
def _serve_metrics(**_kwargs) -> None:
    from .metrics import serve_worker_metrics

    serve_worker_metrics()
