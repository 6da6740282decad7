"""What the edge parsers raise (see :mod:`schemas.parsing`): never anything else."""

from __future__ import annotations

from uuid import UUID

from schemas.common import JobType

_MAX_REASON_LENGTH = 500


def _header_safe(text: str) -> str:
    # The reason travels in an AMQP header (x-failover-reason): keep it ASCII, printable, short.
    safe = text.encode("ascii", "backslashreplace").decode("ascii")
    return safe if len(safe) <= _MAX_REASON_LENGTH else safe[: _MAX_REASON_LENGTH - 3] + "..."


class MessageError(Exception):
    """Base of the errors the parsers raise for a message they cannot use."""


class UnreadableMessage(MessageError):
    """A delivery without a readable ``request_id``: dead-letter it, with ``reason`` in the
    ``x-failover-reason`` header.

    ``code`` is a short, fixed word for metrics and tests: ``too_large``, ``not_utf8``,
    ``not_json``, ``not_object`` or ``no_request_id``.
    """

    def __init__(self, reason: str, *, code: str = "unreadable") -> None:
        self.reason = _header_safe(reason)
        self.code = code
        super().__init__(self.reason)


class InvalidCommand(MessageError):
    """A command with a readable ``request_id`` but an unknown ``type``, an unsupported
    ``schema_version`` or a field missing or wrong: answer it with ``JobRejected``
    (``reason: invalid``, ``detail``).

    ``detail`` names each field and its problem, joined with ``"; "`` (each one is also in
    ``problems``). ``command_type`` is set only for a known command type; ``vm_id`` only when the
    body's ``vm_id`` is itself valid; ``job_type`` when the body says which job it would have
    been (a ``FailoverRequested`` with a valid ``failover_type``, any ``CleanupRequested``);
    ``target_job_id`` when the body names a job readably (``failover_job_id`` of a cleanup, or
    ``job_id`` of a cancel or rollback), e.g. for the ``JobRejected``'s ``correlation_id``.
    """

    def __init__(
        self,
        request_id: UUID,
        command_type: str | None,
        vm_id: str | None,
        detail: str,
        *,
        job_type: JobType | None = None,
        target_job_id: UUID | None = None,
        problems: tuple[str, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.command_type = command_type
        self.vm_id = vm_id
        self.detail = detail
        self.job_type: JobType | None = job_type
        self.target_job_id = target_job_id
        self.problems = problems or (detail,)
        super().__init__(detail)


class InvalidEvent(MessageError):
    """An event body that is not a valid event of this contract version.

    ``event_type`` and ``job_id`` are filled in when the body has them readably, for logs.
    """

    def __init__(
        self, detail: str, *, event_type: str | None = None, job_id: UUID | None = None
    ) -> None:
        self.detail = detail
        self.event_type = event_type
        self.job_id = job_id
        super().__init__(detail)


class UnsupportedEvent(InvalidEvent):
    """A well-formed event of a type or ``schema_version`` this version does not know (the
    contract allows new event types): consumers may acknowledge and skip it."""
