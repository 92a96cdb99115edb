"""The service's domain errors. The core raises these; the HTTP edge (``app.api.errors``) alone
turns them into statuses and error bodies.

The input errors come from ``media`` (decoding raises them, in a decode process too); the rest
say what happened to a request that was well formed.
"""

from __future__ import annotations

from media.errors import BadInput, InputError, TooLarge, UnsupportedMedia, WrongShape

__all__ = [
    "BadInput",
    "ClientGone",
    "Closed",
    "DecoderFailed",
    "InferenceFailed",
    "InputError",
    "NotFound",
    "NotReady",
    "Overloaded",
    "ServiceError",
    "TimedOut",
    "TooLarge",
    "Unauthorized",
    "UnsupportedMedia",
    "WrongShape",
]


class ServiceError(Exception):
    """A request the service could not answer, though nothing was wrong with its input."""


class NotFound(ServiceError):
    """No model (or model version) by that name."""


class NotReady(ServiceError):
    """Still loading, or shutting down: try again (elsewhere)."""


class Closed(NotReady):
    """A model's batcher is shutting down and takes no new work."""


class Overloaded(ServiceError):
    """A model's queue, or its uploads waiting to be decoded, are at their limit."""


class DecoderFailed(ServiceError):
    """A decode process died while decoding this clip, twice: try again."""


class TimedOut(ServiceError):
    """Not decoded within DECODE_TIMEOUT_S, or queued longer than REQUEST_TIMEOUT_S."""


class InferenceFailed(ServiceError):
    """The model raised on this clip, alone."""


class ClientGone(ServiceError):
    """The client disconnected before its answer was ready."""


class Unauthorized(ServiceError):
    """A missing or wrong API key."""
