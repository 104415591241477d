"""A team's Celery beat, as the README shows it: gokiq's Celery app plus a `beat_schedule`.

    celery -A tests.e2e.beat_app beat

The interval comes from BEAT_EVERY (seconds) so the test does not wait a minute.
"""

import os

from gokiq_celery import app

app.conf.beat_schedule = {
    "hard-job": {
        "task": "gokiq.enqueue",
        "schedule": float(os.environ.get("BEAT_EVERY", "60")),
        "args": ["HardJob", ["from beat"]],
        "kwargs": {"queue": "critical"},
    },
}
