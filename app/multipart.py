"""A multipart/form-data body, already read, -> its parts (the ``multipart`` package's push parser).

A decode thread or process splits the body here and decodes its frames in the same job, off
the event loop; Starlette's form parser would run on the loop and spool each part to a
temporary file, several times slower (docs/performance.md: decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from media.errors import BadInput, WrongShape


@dataclass
class Part:
    name: str
    filename: str | None  # None: a plain field, not a file
    chunks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


def parse_form(body: bytes, content_type: str, max_files: int, max_fields: int = 16) -> list[Part]:
    """The parts of a multipart/form-data ``body`` in order.

    400 if it does not parse or has more than ``max_fields`` plain fields; 422 with more than
    ``max_files`` file parts (frames, or a video). Its size is bounded before: ``BodyLimit``.
    """
    boundary = parse_options_header(content_type)[1].get("boundary")
    if not boundary:
        raise BadInput("the multipart body could not be parsed (no boundary in its content type)")
    parts: list[Part] = []
    files = 0
    try:  # the parser's own segment limit lies past ours, so that ours (422 for frames) speaks first
        with PushMultipartParser(boundary, max_segment_count=max_files + max_fields + 1) as parser:
            for event in parser.parse(body):
                if isinstance(event, MultipartSegment):
                    if event.disposition != "form-data" or not event.name:
                        raise BadInput("the multipart body could not be parsed (a part without a form-data name)")
                    if event.filename is None:
                        if len(parts) - files >= max_fields:
                            raise BadInput(f"the multipart body has more than {max_fields} fields")
                    else:
                        files += 1
                        if files > max_files:
                            raise WrongShape(f"more file parts (frames) than the limit of {max_files}")
                    parts.append(Part(event.name, event.filename))
                elif event:  # a chunk of the current part's bytes (None ends the part)
                    parts[-1].chunks.append(bytes(event))
    except MultipartError as exc:  # malformed, incomplete, or past the parser's limits
        raise BadInput(f"the multipart body could not be parsed ({exc})") from exc
    return parts
