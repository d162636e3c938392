"""AWS query-protocol error bodies, as IAM and STS send them.

Both the fault injector and the STS login check answer with errors that moto's own
serializer cannot produce (an arbitrary code and status, or ``AccessDenied`` with 403,
which is not in STS's service model). botocore only needs the ``ErrorResponse/Error``
shape and the HTTP status to raise the same ``ClientError`` it would raise against AWS.
No moto import here: the control layer uses it too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from xml.sax.saxutils import escape

_NAMESPACES = {
    "iam": "https://iam.amazonaws.com/doc/2010-05-08/",
    "sts": "https://sts.amazonaws.com/doc/2011-06-15/",
}


@dataclass(frozen=True)
class KnownError:
    """The status and a typical message of an error code IAM or STS can send."""

    status: int
    message: str


# The codes a fault is most often asked for, with AWS's statuses (from the IAM and STS
# service models, or observed: Throttling is not in the IAM model but AWS sends 400).
KNOWN_ERRORS: dict[str, KnownError] = {
    "Throttling": KnownError(400, "Rate exceeded"),
    "ThrottlingException": KnownError(400, "Rate exceeded"),
    "RequestLimitExceeded": KnownError(400, "Request limit exceeded."),
    "ServiceFailure": KnownError(
        500, "The request processing has failed because of an unknown error."
    ),
    "InternalFailure": KnownError(
        500, "The request processing has failed because of an unknown error."
    ),
    "ServiceUnavailable": KnownError(503, "Service is unable to handle request."),
    "EntityTemporarilyUnmodifiable": KnownError(
        409,
        "The request was rejected because it referenced an entity that is temporarily "
        "unmodifiable.",
    ),
    "ConcurrentModification": KnownError(
        409,
        "The request was rejected because multiple requests to change this object were "
        "submitted simultaneously. Wait a few minutes and submit your request again.",
    ),
    "InvalidAuthenticationCode": KnownError(403, "Authentication code for device is not valid."),
    "LimitExceeded": KnownError(
        409,
        "The request was rejected because it attempted to create resources beyond the "
        "current AWS account limits.",
    ),
    "NoSuchEntity": KnownError(
        404,
        "The request was rejected because it referenced a resource entity that does not exist.",
    ),
    "EntityAlreadyExists": KnownError(
        409,
        "The request was rejected because it attempted to create a resource that already exists.",
    ),
    "DeleteConflict": KnownError(
        409,
        "The request was rejected because it attempted to delete a resource that has "
        "attached subordinate entities.",
    ),
    "InvalidInput": KnownError(
        400,
        "The request was rejected because an invalid or out-of-range value was "
        "supplied for an input parameter.",
    ),
    "ValidationError": KnownError(400, "1 validation error detected."),
    "AccessDenied": KnownError(403, "User is not authorized to perform this action."),
    "ExpiredToken": KnownError(400, "The security token included in the request is expired"),
}


def query_error_body(code: str, message: str, *, status: int, service: str = "iam") -> bytes:
    """Render the XML body IAM/STS send with an error (query protocol).

    ``Type`` is ``Sender`` for 4xx and ``Receiver`` for 5xx, as AWS does; botocore reads
    ``Code`` and ``Message`` from it and the status from the HTTP status line.
    """
    namespace = _NAMESPACES.get(service, _NAMESPACES["iam"])
    fault = "Receiver" if status >= 500 else "Sender"
    text = (
        f'<ErrorResponse xmlns="{namespace}">'
        f"<Error><Type>{fault}</Type><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId>"
        "</ErrorResponse>\n"
    )
    return text.encode("utf-8")
