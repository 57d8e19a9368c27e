"""Read a multipart upload as it streams in: small form fields into memory, the two adapter files straight into the
store's staging directory (hashed on the way), other file parts counted and dropped (the registry refuses them).

The form is strict: a part sent twice (two configs, two `adapter_id` fields) or a text field other than
`FORM_FIELDS` is a 400 naming it, rather than one of them silently winning.

The size limit is enforced twice: a `Content-Length` above it is refused before reading, and a body that grows past
it (chunked, or lying about its length) is cut off at that point. Nothing here decides whether the upload is a valid
adapter: the registry validates the staged files afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from switchboard.adapters_store.kinds.base import CONFIG_FILE, WEIGHTS_FILE
from switchboard.adapters_store.store import StagedFile, Staging
from switchboard.serving.api.errors import ApiError, bad_request

FORM_OVERHEAD = 64 * 1024  # boundaries, part headers and the small fields, on top of the files themselves
MAX_FIELD_BYTES = 4096
MAX_PARTS = 8
FORM_FIELDS = ("adapter_id", "public")


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The upload is larger than this server's limit of {limit} bytes (--max-adapter-bytes).",
        code="upload_too_large",
    )


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    file: StagedFile | None = None


class UploadForm:
    """Parser callbacks; after `read_upload`, `fields` holds the text fields and `files` every file part's name."""

    def __init__(self, staging: Staging, max_file_bytes: int) -> None:
        self.staging = staging
        self.max_file_bytes = max_file_bytes
        self.fields: dict[str, str] = {}
        self.files: list[str] = []
        self.file_bytes = 0
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._parts = 0
        self._seen: set[str] = set()  # part names (a file part's: the file's name)

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise bad_request(f"Too many form parts (at most {MAX_PARTS}).")
        self._part = _Part()
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise bad_request('Every form part needs a Content-Disposition header with a "name".')
        self._part.name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None:
            self._part.filename = filename.decode("utf-8", "replace")
            # The part's name decides which file it is (a client may also send it as the field `file`).
            if self._part.name == "file":
                self._part.name = self._part.filename
        elif self._part.name not in FORM_FIELDS:
            raise bad_request(
                f"Unknown form field `{self._part.name}`: send {' and '.join(f'`{f}`' for f in FORM_FIELDS)} "
                f"fields and the files {CONFIG_FILE} and {WEIGHTS_FILE}.",
                param=self._part.name,
            )
        if self._part.name in self._seen:
            raise bad_request(f"The form part `{self._part.name}` is sent twice; send it once.", param=self._part.name)
        self._seen.add(self._part.name)
        if self._part.filename is not None:
            self.files.append(self._part.name)
            if self._part.name in (CONFIG_FILE, WEIGHTS_FILE):
                self._part.file = self.staging.begin(self._part.name)

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part.filename is not None:
            self.file_bytes += len(chunk)
            if self.file_bytes > self.max_file_bytes:
                raise too_large(self.max_file_bytes)
            if self._part.file is not None:
                self._part.file.write(chunk)
            return
        if len(self._part.data) + len(chunk) > MAX_FIELD_BYTES:
            raise bad_request(f"The form field `{self._part.name}` is longer than {MAX_FIELD_BYTES} bytes.")
        self._part.data.extend(chunk)

    def _end(self) -> None:
        part = self._part
        if part.file is not None:
            self.staging.finish(part.name, part.file)
            part.file = None
        elif part.filename is None:
            self.fields[part.name] = part.data.decode("utf-8", "replace")

    def close(self) -> None:
        if self._part.file is not None:
            self._part.file.close()


async def read_upload(request: Request, staging: Staging, max_bytes: int) -> UploadForm:
    """Stream the request's multipart body into `staging`; 400 when malformed, 413 when over `max_bytes`."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise bad_request(
            "Upload adapters as multipart/form-data: adapter_id, adapter_config.json, adapter_model.safetensors."
        )
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("The multipart Content-Type has no boundary.")
    limit = max_bytes + FORM_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(max_bytes)
    form = UploadForm(staging, max_bytes)
    parser = MultipartParser(boundary, form.callbacks())
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise bad_request(f"Malformed multipart body: {exc}") from exc
    finally:
        form.close()
    return form
