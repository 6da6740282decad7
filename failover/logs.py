"""Process logging: JSON lines when not on a terminal (or when asked), readable text otherwise.

Every line a job causes carries `job_id` and `correlation_id`:

- the engine's own lines (`failover.job`, the same lines that become `LogRecorded` events) pass
  them as `extra`;
- any other line logged while a job's code runs (an adapter, a library, the runner) gets them
  from the job's logging context: `bind_job` sets it inside the job's task, and every task that
  task starts inherits it (asyncio copies the context), so it never leaks to another job;
- the runner's own lines about a job (its task is named `job-<job_id>`, and they may pass
  `job_id` alone) get the correlation id `remember_job` noted when the job was loaded.

Secrets never reach here: settings are logged only through `Settings.safe_summary`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Final, TextIO

__all__ = ["JOB_TASK_PREFIX", "JobFields", "JsonFormatter", "TextFormatter", "bind_job", "configure",
           "remember_job"]

_EXTRA = ("job_id", "correlation_id", "step", "fields")

JOB_TASK_PREFIX: Final = "job-"
"""The job runner names the task that drives a job `job-<job_id>`."""

_job: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("failover_job", default=None)
_correlations: OrderedDict[str, str] = OrderedDict()
_REMEMBERED: Final = 10_000  # correlation ids kept for the runner's lines (a bounded memory)


def remember_job(job_id: str, correlation_id: str) -> None:
    """Note a job's correlation id, for lines that name the job but not its correlation."""
    _correlations[job_id] = correlation_id
    _correlations.move_to_end(job_id)
    while len(_correlations) > _REMEMBERED:
        _correlations.popitem(last=False)


def bind_job(job_id: str, correlation_id: str) -> None:
    """Mark the current task (and the tasks it starts) as working on this job."""
    if _job.get() != (job_id, correlation_id):
        _job.set((job_id, correlation_id))
    remember_job(job_id, correlation_id)


def _task_job() -> str | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: a thread or start-up code
        return None
    name = task.get_name() if task is not None else ""
    return name[len(JOB_TASK_PREFIX):] if name.startswith(JOB_TASK_PREFIX) else None


class JobFields(logging.Filter):
    """Adds `job_id` and `correlation_id` to a record logged on behalf of a job."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            bound = _job.get()
            if bound is not None:
                record.__dict__.update(job_id=bound[0], correlation_id=bound[1])  # as `extra` does
            else:
                job_id = _task_job()
                if job_id is not None:
                    record.__dict__.update(job_id=job_id, correlation_id=_correlations.get(job_id))
        job_id = record.__dict__.get("job_id")
        if job_id is not None and record.__dict__.get("correlation_id") is None:
            record.__dict__["correlation_id"] = _correlations.get(str(job_id))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _EXTRA:
            value = getattr(record, key, None)
            if value not in (None, {}):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job_id", None)
        if not job:
            return line
        correlation = getattr(record, "correlation_id", None)
        related = f" correlation {correlation}" if correlation and correlation != job else ""
        return f"{line} [job {job}{related}]"


def configure(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr): `json`, `text`, or `auto` (JSON unless it is a terminal)."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(JobFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # asyncmy logs every server note as a warning, e.g. each duplicate an INSERT IGNORE skipped
    logging.getLogger("asyncmy").setLevel(logging.ERROR)
