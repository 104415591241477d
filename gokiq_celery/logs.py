"""JSON log lines for every gokiq process: one object per line, with jid, class and queue."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else passed with `extra=` goes into the line.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# A job's arguments may hold personal data: never in a line. Celery passes them in its log
# context (`extra={"data": {"args": ..., "kwargs": ...}}`) on its task lines.
_ARGUMENTS = frozenset({"args", "kwargs", "argsrepr", "kwargsrepr"})
# Celery's own line for each task received and succeeded; at INFO gokiq's start/done lines say
# the same per job (jid, class, queue, elapsed), as Sidekiq's do.
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")
# One encoder for every line: json.dumps with options builds a new one per call. It keeps no
# state between calls, so threads share it.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


def _extras(record: logging.LogRecord) -> dict[str, object]:
    """The fields passed with `extra=`, without job arguments."""
    extras = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key in _ARGUMENTS:
            continue
        if key == "data" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _ARGUMENTS}
        extras[key] = value
    return extras


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")  # the last second formatted, and its text

    def _ts(self, record: logging.LogRecord) -> str:
        # Formatted once a second (a worker writes two lines per job). One tuple, read and
        # replaced whole: threads racing at most format the same second twice, never pair a
        # second with another's text.
        second = int(record.created)
        cached, text = self._second
        if second != cached:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self._ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(line)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal; the `extra=` fields follow the message as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        base = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        text = f"{base} {extras}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


class LineHandler(logging.StreamHandler):
    """A StreamHandler that formats a record before taking the handler's lock, so that twenty
    job threads do not queue behind one another's formatting; only the write is serialised."""

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        try:
            line = self.format(record) + self.terminator
        except RecursionError:  # as StreamHandler.emit: not a formatting error to report
            raise
        except Exception:
            self.handleError(record)
            return True
        with self.lock:
            try:
                self.stream.write(line)
                self.flush()
            except RecursionError:
                raise
            except Exception:
                self.handleError(record)
        return True


def setup_logging(level: str | int = "INFO", fmt: str = "json") -> None:
    """Route the root logger to stderr in the chosen format (replacing other handlers)."""
    # What gokiq's lines never show, so no record gathers it (the logging HOWTO's
    # "Optimization"): the caller's frame (a walk up the stack), the thread's name, the
    # process id (a syscall) and the multiprocessing process name. A worker writes two lines
    # per job, on the GIL its twenty job threads share.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LineHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Celery's task lines only at DEBUG: at INFO they would be two more lines per job, each
    # formatted on the worker's one GIL (their warnings and errors still show).
    quiet = root.getEffectiveLevel() == logging.INFO
    for name in CELERY_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
