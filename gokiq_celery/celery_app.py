"""The Celery app `celery -A gokiq_celery` finds, with gokiq's tasks and Busy-page bootstep.

Building it configures nothing: Celery reads its configuration (celeryconfig.py, from gokiq's
settings) the first time something needs it, as a worker, Flower or beat starts.
"""

import logging

import click
from celery import Celery
from celery.signals import import_modules, worker_ready
from celery.signals import setup_logging as celery_setup_logging
from click.core import ParameterSource

from celeryconfig import process_celery_config

from .heartbeat import SidekiqHeartbeat
from .logs import setup_logging
from .metrics import serve_worker_metrics
from .settings import ConfigError, process_settings

app = Celery("gokiq")
app.add_defaults(process_celery_config)  # read when the configuration is first needed
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
def _serve_metrics(sender=None, **_kwargs) -> None:
    from .worker import current_worker  # built at worker_init (gokiq_celery.tasks)

    worker = current_worker()
    serve_worker_metrics(worker.settings, worker.metrics.registry)


@import_modules.connect
def _gokiq_logging_by_default(sender: Celery | None = None, **_kwargs) -> None:
    """gokiq's log format is the default when a Celery command loads the app's modules, so that
    Flower logs JSON lines like every gokiq process. Flower loads them after tornado has given
    the root logger a handler of its own (it adds one when there is none): in `celery flower`
    gokiq's replaces it; elsewhere it is only added when nobody configured logging."""
    if sender is not app or (logging.getLogger().handlers and not _in_command("flower")):
        return
    try:
        settings = process_settings()
    except ConfigError:
        return  # the configuration, read next, reports it in one line and stops
    setup_logging(settings.log_level, settings.log_format)


@import_modules.connect
def _flower_turns_events_on_at_once(sender: Celery | None = None, **_kwargs) -> None:
    """Workers send task events only once a monitor asks (celeryconfig.py). Flower asks every
    5 s, the first time 5 s after it starts: in `celery flower`, ask as it starts instead, so
    it sees every job from its first second."""
    if sender is None or not _in_command("flower"):
        return
    try:
        sender.control.enable_events()
    except Exception as exc:  # the broker is down: Flower's own timer asks again later
        logging.getLogger(__name__).warning("could not turn task events on: %s", exc)


def _in_command(name: str) -> bool:
    """Whether this process runs the Celery command `name` (`celery -A gokiq_celery <name>`)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.info_name == name
