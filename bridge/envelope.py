"""The `gokiq.perform` message for one job, as Celery's protocol 2 and kombu's Redis transport
write it, built fast.

`TaskMessages.task_message` is Celery's own message (`app.amqp.as_task_v2`); the Producer path
(AMQP) publishes that. For a Redis broker the bridge writes kombu's envelope itself, one LPUSH
per batch. Building and serialising that envelope with Celery's and kombu's dicts costs ~80 µs
a job (three JSON encodes, a base64), which alone would cap a bridge near 12,000 jobs/s.

Messages differ only in a few values (jid, class, args repr, retry counter, payload, token,
delivery tag), so `EnvelopeTemplate` compiles the text kombu writes for a message built from
sentinel values once, cut at each sentinel, and joins each job's values in between, escaped as
kombu's JSON escapes strings. `TaskMessages` checks the template against the slow path at
start-up and uses the slow path if they differ, so a Celery or kombu that writes another shape
is never sent a wrong message (tests/test_bridge_envelope.py checks arbitrary jobs against it too).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as json_string
from typing import Any

from celery import Celery
from kombu import serialization
from kombu.utils import json as kombu_json

from gokiq_celery.messages import TASK_NAME, argsrepr, celery_retries, publish_options, task_id
from gokiq_celery.sidekiq.job import Job

log = logging.getLogger(__name__)

PERSISTENT = 2  # AMQP delivery mode: the broker keeps the message on disk

# Sentinel values stand where a job's own values go; _SLOT finds them in kombu's JSON text
# (strings escaped to ASCII, in quotes).
_SENTINEL = "\x00gokiq:{}\x00"
_SENTINEL_INT = 7_102_938_475  # Celery's `retries` header is an integer
_SLOT = re.compile(r'"\\u0000gokiq:(\w+)\\u0000"|' + str(_SENTINEL_INT))


def bridge_celery_app() -> Celery:
    """A Celery app that only builds task messages: protocol 2, JSON, as the workers expect."""
    app = Celery("gokiq-bridge", set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_protocol=2)
    return app


class EnvelopeTemplate:
    """One message's text, cut where each per-job value goes."""

    def __init__(self, text: str) -> None:
        # split() alternates literal text and slot names (None where the integer matched).
        pieces = _SLOT.split(text)
        self.head = pieces[0]
        self.slots = tuple(
            (name or "retries", literal)
            for name, literal in zip(pieces[1::2], pieces[2::2], strict=True)
        )

    def fill(self, values: Mapping[str, str]) -> str:
        """The text with each slot replaced by its value, which must already be JSON text."""
        out = [self.head]
        for name, literal in self.slots:
            out.append(values[name])
            out.append(literal)
        return "".join(out)


def _delivery_tag() -> str:
    """A random UUID 4 string like kombu's `uuid()`, at a third of the cost of uuid.uuid4()."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _sentinel(name: str) -> str:
    return _SENTINEL.format(name)


class TaskMessages:
    """Builds the messages the bridge publishes for its jobs."""

    def __init__(self, app: Celery | None = None) -> None:
        self.app = app or bridge_celery_app()
        self.origin = f"gokiq-bridge@{socket.gethostname()}"
        # (Sidekiq queue, Celery queue) -> (body, envelope) templates; None: use the slow path
        self._templates: dict[tuple[str, str], tuple[EnvelopeTemplate, EnvelopeTemplate] | None]
        self._templates = {}

    def task_message(self, job: Job, queue: str, token: str, *, jid: str | None = None):
        """Celery's protocol 2 message: `gokiq.perform(payload_text, queue, delivery=token)`,
        with the options every `gokiq.perform` message has (gokiq_celery/messages.py)."""
        options = publish_options(job, queue)
        default_id = options.pop("task_id")
        return self.app.amqp.as_task_v2(
            jid or default_id,
            TASK_NAME,
            args=(job.text, queue),
            kwargs={"delivery": token},
            origin=self.origin,
            **options,
        )

    def redis_envelope(self, channel, job: Job, token: str, queue: str, celery_queue: str) -> str:
        """The text kombu's Redis channel LPUSHes for this message."""
        key = (queue, celery_queue)
        if key not in self._templates:
            self._templates[key] = self._compile(channel, queue, celery_queue)
        templates = self._templates[key]
        if templates is None:
            return kombu_json.dumps(self.kombu_envelope(channel, job, token, queue, celery_queue))
        return _fill(templates, job, token, queue)

    def kombu_envelope(
        self, channel, job: Job, token: str, queue: str, celery_queue: str, *, jid=None
    ) -> dict[str, Any]:
        """The envelope exactly as kombu's `basic_publish` prepares it (the slow path)."""
        message = self.task_message(job, queue, token, jid=jid)
        content_type, content_encoding, body = serialization.dumps(message.body, "json")
        envelope = channel.prepare_message(
            body,
            0,
            content_type,
            content_encoding,
            message.headers,
            {**message.properties, "delivery_mode": PERSISTENT},
        )
        channel._inplace_augment_message(envelope, "", celery_queue)
        return envelope

    def _compile(self, channel, queue: str, celery_queue: str):
        """Templates from a message of sentinels, kept only if they reproduce the slow path."""
        fields = {"class": _sentinel("shadow"), "args": [], "retry_count": _SENTINEL_INT - 1}
        probe = Job(_sentinel("payload"), fields)
        token, jid = _sentinel("token"), _sentinel("id")
        _, _, body = serialization.dumps(
            self.task_message(probe, queue, token, jid=jid).body, "json"
        )
        envelope = self.kombu_envelope(channel, probe, token, queue, celery_queue, jid=jid)
        envelope["body"] = _sentinel("body")
        envelope["headers"]["argsrepr"] = _sentinel("argsrepr")
        envelope["properties"]["delivery_tag"] = _sentinel("tag")
        templates = EnvelopeTemplate(body), EnvelopeTemplate(kombu_json.dumps(envelope))
        if self._reproduces(templates, channel, queue, celery_queue):
            return templates
        log.warning("kombu writes an unexpected message shape: using its slow publish path")
        return None

    def _reproduces(self, templates, channel, queue: str, celery_queue: str) -> bool:
        job = Job.build(
            {
                "class": 'Ünïcode::"Job"{x}',
                "args": ["\u2603 {}", {"a": [1, 2.5, None]}],
                "jid": "0123456789abcdef01234567",
                "retry_count": 3,
                "wrapped": "Wrapped\\Job",
            }
        )
        fast = _fill(templates, job, "tok{}", queue)
        slow = self.kombu_envelope(channel, job, "tok{}", queue, celery_queue)
        slow["properties"]["delivery_tag"] = kombu_json.loads(fast)["properties"]["delivery_tag"]
        return fast == kombu_json.dumps(slow)


def _fill(templates: tuple[EnvelopeTemplate, EnvelopeTemplate], job: Job, token: str, queue: str):
    body, envelope = templates
    body_text = body.fill({"payload": json_string(job.text), "token": json_string(token)})
    return envelope.fill(
        {
            "body": '"' + base64.b64encode(body_text.encode()).decode() + '"',
            "id": json_string(task_id(job)),
            "shadow": json_string(job.display_class),
            "argsrepr": json_string(argsrepr(job, queue)),
            "retries": str(celery_retries(job)),
            "tag": '"' + _delivery_tag() + '"',
        }
    )
