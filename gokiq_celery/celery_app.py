"""The Celery app: configured from `celeryconfig.py`, with gokiq's tasks registered."""

import logging

import click
from celery import Celery
from celery.signals import import_modules, worker_ready
from celery.signals import setup_logging as celery_setup_logging
from click.core import ParameterSource

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
    """Celery's worker logs in gokiq's format (JSON lines by default) instead of its own, at
    `--loglevel` when given, else at gokiq's `log_level` (INFO), not Celery's WARNING."""
    settings = process_settings()
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.get_parameter_source("loglevel") is ParameterSource.DEFAULT:
        loglevel = None
    setup_logging(loglevel or settings.log_level, settings.log_format)


@worker_ready.connect
def _serve_metrics(**_kwargs) -> None:
    from .metrics import serve_worker_metrics

    serve_worker_metrics()


@import_modules.connect
def _flower_turns_events_on_at_once(sender: Celery | None = None, **_kwargs) -> None:
    """Workers send task events only once a monitor asks (celeryconfig.py). Flower asks every
    5 s, the first time 5 s after it starts: in `celery flower`, ask as it starts instead, so
    it sees every job from its first second."""
    ctx = click.get_current_context(silent=True)
    if sender is None or ctx is None or ctx.info_name != "flower":
        return
    try:
        sender.control.enable_events()
    except Exception as exc:  # the broker is down: Flower's own timer asks again later
        logging.getLogger(__name__).warning("could not turn task events on: %s", exc)
