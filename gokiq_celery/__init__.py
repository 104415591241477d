"""gokiq's worker side: `celery -A gokiq_celery worker` finds `app` here.

The Celery app is built on first access so that the bridge, which only needs the Sidekiq
model, does not build one.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from .celery_app import app

        return app
    raise AttributeError(name)
