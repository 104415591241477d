"""Log lines never carry a job's arguments, and at INFO Celery's per-task lines give way to
gokiq's start/done lines (tests/e2e/test_jobs.py checks the real worker's output)."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from gokiq_celery.logs import CELERY_TASK_LOGGERS, JsonFormatter, TextFormatter, setup_logging

SECRET = "personal-data-55"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    gathered = (logging._srcfile, logging.logThreads, logging.logProcesses)
    multiprocessing = logging.logMultiprocessing
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging._srcfile, logging.logThreads, logging.logProcesses = gathered
    logging.logMultiprocessing = multiprocessing
    for name in CELERY_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def celery_task_record() -> logging.LogRecord:
    """A record shaped as Celery's `Task %(name)s[%(id)s] succeeded` line is."""
    context = {
        "id": "jid-1",
        "name": "HardJob",
        "return_value": "'ok'",
        "runtime": 0.01,
        "args": f"['{SECRET}']",
        "kwargs": "{}",
    }
    logger = logging.getLogger("celery.app.trace")
    return logger.makeRecord(
        logger.name,
        logging.INFO,
        __file__,
        1,
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
        (context,),
        None,
        extra={"data": context, "kwargs": {"user": SECRET}},
    )


def test_json_lines_keep_celery_context_but_drop_job_arguments():
    line = json.loads(JsonFormatter().format(celery_task_record()))
    assert SECRET not in json.dumps(line)
    assert line["msg"] == "Task HardJob[jid-1] succeeded in 0.01s: 'ok'"
    assert line["data"] == {
        "id": "jid-1",
        "name": "HardJob",
        "return_value": "'ok'",
        "runtime": 0.01,
    }


def test_text_lines_drop_job_arguments_too():
    text = TextFormatter().format(celery_task_record())
    assert SECRET not in text and "HardJob[jid-1] succeeded" in text


def test_info_leaves_celery_task_lines_to_gokiq_debug_keeps_them(restore_logging):
    setup_logging("INFO")
    for name in CELERY_TASK_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
    assert logging.getLogger("gokiq.worker").isEnabledFor(logging.INFO)
    setup_logging("DEBUG")
    assert all(logging.getLogger(n).isEnabledFor(logging.INFO) for n in CELERY_TASK_LOGGERS)


def test_a_json_line_is_written_for_gokiq_records(restore_logging, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    setup_logging("INFO")
    logging.getLogger("gokiq.worker").info("done", extra={"jid": "j", "class": "C", "queue": "q"})
    line = json.loads(out.getvalue())
    assert (line["msg"], line["jid"], line["class"], line["queue"]) == ("done", "j", "C", "q")


def test_json_timestamps_stay_exact_across_seconds():
    """The second is formatted once and reused: each line still says its own time."""
    formatter = JsonFormatter()
    for created in (1764687599.998, 1764687599.999, 1764687600.0, 1764687600.5, 1764687599.2):
        record = logging.makeLogRecord({"msg": "m", "created": created})
        record.msecs = (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        assert json.loads(formatter.format(record))["ts"] == f"{expected}.{int(record.msecs):03d}Z"


def test_a_line_that_cannot_be_formatted_is_reported_not_raised(restore_logging, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    setup_logging("INFO")
    reported = []
    monkeypatch.setattr(logging.Handler, "handleError", lambda self, record: reported.append(1))
    logging.getLogger("gokiq.worker").info("%d", "not a number")
    assert reported == [1] and out.getvalue() == ""
