"""The names the desk's messages use: event kinds, outcomes and token states.

The daemon publishes events and final answers as JSON objects whose ``event``, ``outcome``
and ``state`` fields carry these values; the CLI, ``watch`` and the metrics read them back.
They are ``StrEnum`` so that the wire (and the store's rows) keep exactly the strings they
always had, while the code compares members, never literals.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from provisioner.core.errors import ExitStatus, ProvisionerError, exit_status, failure_reason


class EventKind(StrEnum):
    """The ``event`` field of what the daemon publishes and streams to clients."""

    # the readers (the reader watch's own kinds, passed on as they are)
    READER_ADDED = "reader-added"
    READER_REMOVED = "reader-removed"
    CARD_INSERTED = "card-inserted"
    TOKEN_REMOVED = "token-removed"
    PCSC_DOWN = "pcsc-down"
    PCSC_UP = "pcsc-up"
    # a token in a reader
    TOKEN = "token"
    TOKEN_ERROR = "token-error"
    TOKEN_HELD = "token-held"
    UNSUPPORTED = "unsupported"
    IGNORED = "ignored"
    # work on a token
    ENROLLING = "enrolling"
    STEP = "step"
    NOTICE = "notice"
    OUTCOME = "outcome"
    REVOKED = "revoked"
    CLEANED = "cleaned"
    # the queue
    REQUEST_QUEUED = "request-queued"
    QUEUED = "queued"
    WAITING = "waiting"
    # the live status (watch)
    UPDATE = "update"
    HEARTBEAT = "heartbeat"


class Outcome(StrEnum):
    """How a piece of work on a token ended: the ``outcome`` of a final answer."""

    ENROLLED = "enrolled"
    REPLACED = "replaced"
    ALREADY_ENROLLED = "already enrolled"
    ENROLLED_OLD_NOT_REVOKED = "enrolled, old token NOT revoked"
    FAILED = "failed"
    FAILED_NOT_ROLLED_BACK = "failed, NOT rolled back"
    # recovery's, for an enrollment a crash interrupted
    IN_PROGRESS = "in progress"
    ROLLED_BACK = "rolled back"
    REVOKED = "revoked"
    RESYNCED = "resynced"
    RESYNC_FAILED = "resync failed"
    CANCELLED = "cancelled"
    DAEMON_STOPPING = "daemon stopping"
    #: a device made ahead of a plug that never came (deleted; the reason says why)
    NOT_USED = "not used"


class TokenState(StrEnum):
    """What the desk is doing with a token in a reader, as status and ``watch`` show it."""

    IDENTIFYING = "identifying"
    HELD = "held"
    ENROLLING = "enrolling"
    RESYNCING = "resyncing"
    ENROLLED = "enrolled"
    IDLE = "idle"
    UNSUPPORTED = "unsupported"
    FAILED = "failed"


# --- answers: the daemon's final words on a request, built in one place ------------------

Answer = dict[str, Any]


def refusal(error: str, status: int | None = None, **extra: Any) -> Answer:
    """The final answer that says no: the operator's one line and, where there is one, the
    exit status the CLI ends with."""
    answer: Answer = {"ok": False, "final": True, "error": error}
    if status is not None:
        answer["exit"] = int(status)
    answer.update(extra)
    return answer


def success(**fields: Any) -> Answer:
    """The final answer that says yes, with what the request asked for."""
    return {"ok": True, "final": True, **fields}


def error_answer(error: ProvisionerError) -> Answer:
    """The final answer for a request an error stopped."""
    return refusal(error.one_line(), exit_status(error))


def already_enrolled(error: ProvisionerError) -> Answer:
    """The outcome of work on a token that was already enrolled for the user: nothing to
    do, and no failure."""
    return {
        "ok": True,
        "outcome": Outcome.ALREADY_ENROLLED,
        "detail": error.message,
        "exit": int(ExitStatus.OK),
    }


def failure_outcome(error: ProvisionerError) -> Outcome:
    """How a failed enrollment ends: rolled back, or not wholly (something left named)."""
    leftovers = getattr(error, "leftovers", ())
    return Outcome.FAILED_NOT_ROLLED_BACK if leftovers else Outcome.FAILED


def failed_outcome(outcome: str, error: ProvisionerError, **extra: Any) -> Answer:
    """The outcome of work on a token that failed: what, why (a stable reason for the
    metrics), the operator's one line and the exit status; ``extra`` adds or overrides."""
    return {
        "ok": False,
        "outcome": outcome,
        "reason": failure_reason(error),
        "detail": error.one_line(),
        "exit": int(exit_status(error)),
        **extra,
    }
