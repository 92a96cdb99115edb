"""What can be wrong with a client's input. Domain errors: no HTTP here; the server's edge
(``app.api.errors``) gives each its status. They pickle whole, so a decode process can raise them."""

from __future__ import annotations


class InputError(Exception):
    """An input that cannot be served as it was sent; the message says which part and why."""


class BadInput(InputError):
    """Not decodable: a corrupt image or video, bad base64 or JSON, a malformed form."""


class TooLarge(InputError):
    """Past a size limit: a frame's pixels, a video's frames, a body's bytes."""


class UnsupportedMedia(InputError):
    """A format, content type or encoding this build does not take."""


class WrongShape(InputError):
    """The wrong count or shape: no frames, more than the limit, a tensor that does not fit the model."""


class Stopped(Exception):
    """A decode stopped because its result is no longer wanted (its request timed out or its client left).
    Not the client's input's fault: it has no status of its own."""
