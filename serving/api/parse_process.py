"""JSON bodies parsed and validated as FastAPI would (`parse_body`), and a child process that does it for big ones
(`ParseProcess`).

Parsing holds the GIL throughout (json, then pydantic, both native code): about 40 ms a mebibyte of numbers, during
which the engine's step thread and the event loop cannot run. The child holds its own GIL; the server's process only
unpickles the validated model it sends back, a fraction of that (nothing for fields the model ignores).

The child is `python -I -m switchboard.serving.api.parse_process`, started on first use and again after it dies. It
imports this module and the body models' modules only, never the program's main module (as multiprocessing's spawn
would) nor torch. Messages are length-prefixed pickles: (body, model) to its stdin, ("ok", value) or ("invalid",
errors) from its stdout. It exits when its stdin closes. Only these two processes of ours pickle and unpickle: a
client's body crosses as raw bytes inside the message and is parsed as JSON in the child, never unpickled.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, Any

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
# The child's CPU priority, below the server's: parsing a big body is bulk work, and on a machine of few cores the
# engine's step threads must not wait for a core while it runs (its own GIL is not the server's, so nothing there
# waits on it).
NICENESS = 10


def parse_body(raw: bytes, model: type) -> Any:
    """`raw` parsed and validated as `model`, as FastAPI would (errors located under "body"). Raises only
    `RequestValidationError`, whose errors carry no input values (a wrong list of a million items stays here)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _json_invalid(exc.msg, exc.pos) from exc
    except RecursionError as exc:
        raise _json_invalid("it is nested too deeply") from exc
    except ValueError as exc:  # not UTF-8 (or UTF-16/32) text
        raise _json_invalid(str(exc)) from exc
    try:
        return _adapter(model).validate_python(data, from_attributes=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in errors]) from None


@functools.cache
def _adapter(model: type) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def _json_invalid(reason: str, position: int = 0) -> RequestValidationError:
    """FastAPI's error for a body that is not JSON."""
    error = {"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error", "input": {}}
    return RequestValidationError([{**error, "ctx": {"error": reason}}])


class ParseProcess:
    """`parse_body` in the child process. Blocking: call `parse` from a worker thread; calls take turns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None

    def parse(self, raw: bytes, model: type) -> Any:
        with self._lock:
            try:
                status, value = self._exchange((raw, model))
            except (OSError, EOFError, pickle.UnpicklingError):  # the child died: parse here this once
                logger.warning("the body parsing process died; parsing this body in the server's process")
                self._stop()
                return parse_body(raw, model)
        if status == "invalid":
            raise RequestValidationError(value)
        return value

    def _exchange(self, message: object) -> tuple[str, Any]:
        if self._child is None or self._child.poll() is not None:
            command = [sys.executable, "-I", "-m", __name__]
            self._child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._child.stdin is not None and self._child.stdout is not None
        _write(self._child.stdin, message)
        return _read(self._child.stdout)

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.wait()

    def close(self) -> None:
        with self._lock:
            self._stop()


def _write(stream: IO[bytes], message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the parse process closed its output")
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the parse process closed its output")
    return pickle.loads(data)


def _serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The child: parse each body sent until the input closes."""
    while True:
        try:
            raw, model = _read(requests)
        except EOFError:
            return
        try:
            answer: tuple[str, Any] = ("ok", parse_body(raw, model))
        except RequestValidationError as exc:
            answer = ("invalid", exc.errors())
        _write(answers, answer)


if __name__ == "__main__":
    os.nice(NICENESS)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever else writes to stdout goes to stderr
    _serve(sys.stdin.buffer, answers)
