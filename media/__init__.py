"""Frames from encoded media, the same way for training and serving: image and video decoding,
resizing to a model's frame size, and segment sampling. Imports neither torch, ``app`` nor
``training``, so a decode process stays small."""

from media.errors import BadInput, InputError, Stopped, TooLarge, UnsupportedMedia, WrongShape
from media.images import IMAGE_FORMATS, decode_image
from media.sampling import sample_indices
from media.spec import FrameFormat, Limits
from media.video import decode_video, video_length

__all__ = [
    "IMAGE_FORMATS",
    "BadInput",
    "FrameFormat",
    "InputError",
    "Limits",
    "Stopped",
    "TooLarge",
    "UnsupportedMedia",
    "WrongShape",
    "decode_image",
    "decode_video",
    "sample_indices",
    "video_length",
]
