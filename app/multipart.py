"""A multipart/form-data body, already read, -> its parts (python-multipart's streaming parser).

``/predict`` reads the whole body on the event loop (it is bounded by ``BodyLimit``) and
hands it to a decode thread, which splits it here and decodes the frames in the same job.
Starlette's form parser would run on the event loop and give each part an ``UploadFile``
(a spooled temporary file): 0.9 ms for a body of 16 JPEG frames, where these callbacks,
which only keep each part's name, filename and bytes, take about a third of that
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from app.errors import bad_input, wrong_shape


@dataclass
class Part:
    name: str
    filename: str | None  # None: a plain field, not a file
    chunks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


@dataclass
class _State:
    max_files: int
    max_fields: int
    parts: list[Part] = field(default_factory=list)
    files: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_name: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)

    def on_part_begin(self) -> None:
        self.headers.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_name).lower()] = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self.headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise bad_input("the multipart body could not be parsed (a part without a form-data name)")
        filename = options.get(b"filename")
        part = Part(options[b"name"].decode("latin-1"), None if filename is None else filename.decode("latin-1"))
        if part.filename is None:
            if len(self.parts) - self.files >= self.max_fields:
                raise bad_input(f"the multipart body has more than {self.max_fields} fields")
        else:
            self.files += 1
            if self.files > self.max_files:
                raise wrong_shape(f"more file parts (frames) than the limit of {self.max_files}")
        self.parts.append(part)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1].chunks.append(data[start:end])


def parse_form(body: bytes, content_type: str, max_files: int, max_fields: int = 16) -> list[Part]:
    """The parts of a multipart/form-data ``body`` in order.

    400 if it does not parse or has more than ``max_fields`` plain fields; 422 with more than
    ``max_files`` file parts (frames, or a video). Its size is bounded before: ``BodyLimit``.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_input("the multipart body could not be parsed (no boundary in its content type)")
    state = _State(max_files, max_fields)
    callbacks = {
        "on_part_begin": state.on_part_begin,
        "on_header_field": state.on_header_field,
        "on_header_value": state.on_header_value,
        "on_header_end": state.on_header_end,
        "on_headers_finished": state.on_headers_finished,
        "on_part_data": state.on_part_data,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise bad_input(f"the multipart body could not be parsed ({exc})") from exc
    return state.parts
