"""The Celery app: configured from `celeryconfig.py`, with gokiq's one task registered."""

from celery import Celery
from celery.signals import setup_logging as celery_setup_logging
from celery.signals import worker_ready

from .logs import setup_logging

app = Celery("gokiq")
app.config_from_object("celeryconfig")
app.conf.include = ["gokiq_celery.tasks"]


@celery_setup_logging.connect
def _json_logging(loglevel=None, **_kwargs) -> None:
    """Celery's worker logs in gokiq's format (JSON lines by default) instead of its own."""
    from .settings import load_settings

    settings = load_settings()
    setup_logging(loglevel or settings.log_level, settings.log_format)


@worker_ready.connect
def _serve_metrics(**_kwargs) -> None:
    from .metrics import serve_worker_metrics

    serve_worker_metrics()
