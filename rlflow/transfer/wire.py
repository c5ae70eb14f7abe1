"""The bus wire protocol: one place for every frame that crosses a socket.

A message is a ZeroMQ multipart message ``[header, *payload]``:

- ``header`` is a small UTF-8 JSON object. Requests carry ``op`` (the verb) and ``id`` (echoed in the
  reply so a late reply to an abandoned call is never mistaken for the current one). Replies carry
  ``ok``; on failure ``error`` (a sentence naming the problem) and ``kind`` (an error class name).
- each ``payload`` frame is one Arrow IPC *stream* (schema + exactly one record batch). Streams are
  self-describing (~600 B of schema per message), so the server checks every column's type against the
  declared one and names the column that disagrees, and a consumer never needs a schema handshake.

Zero-copy: frames are sent with ``copy=False`` and decoded with ``pa.ipc.open_stream(pa.py_buffer(..))``,
so decoded Arrow arrays point into the ZeroMQ frame (which the buffer keeps alive). The server stores
received frames as they are and forwards them untouched when a consumer takes a whole put.

Why JSON and not msgpack: headers are a few hundred bytes and never on the per-byte path; JSON is in the
standard library and readable in a packet capture.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

PROTOCOL_VERSION = 1

# Row identity columns every put carries; the bus understands these two and nothing else about a row.
UID = "uid"  # string, unique over the live rows of one bus
GROUP = "group_id"  # string; rows of one group are created by one put (a group is sealed at creation)
RESERVED_COLUMNS = (UID, GROUP)


class BusError(Exception):
    """A request the bus refused; the message names the problem and, where there is one, the fix."""

    kind = "BusError"


class SchemaError(BusError):
    kind = "SchemaError"


class ProtocolError(BusError):
    kind = "ProtocolError"


class CapacityError(BusError):
    kind = "CapacityError"


class LeaseExpired(BusError):
    """An ack/nack/renew named a lease the bus no longer holds: it expired or was released, and its rows
    went back to the other replicas (who may have finished them already: work is at-least-once)."""

    kind = "LeaseExpired"


class BusTimeout(BusError, TimeoutError):
    """A bounded wait ran out; the message says what was waited for and what state it was in."""

    kind = "BusTimeout"


class Unauthorized(BusError):
    """A request its connection's credential does not allow (``transfer/access.py``); the message names
    what was asked and what is allowed."""

    kind = "Unauthorized"


ERRORS = {cls.kind: cls for cls in (BusError, SchemaError, ProtocolError, CapacityError, LeaseExpired, BusTimeout,
                                     Unauthorized)}


# ---------------------------------------------------------------------------------------------------
# headers


def encode_header(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Parse a header frame (of the bus, the channel, a relay or the control socket); raises ProtocolError
    naming what is wrong with it, whatever is wrong: not UTF-8, not JSON, nested past the parser's
    recursion limit (``[[[...]]]`` 200,000 deep), or not an object."""
    try:
        header = json.loads(bytes(frame))
    except (ValueError, RecursionError) as e:  # ValueError: UnicodeDecodeError and JSONDecodeError among them
        raise ProtocolError(f"header frame is not a JSON object ({e.__class__.__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header frame must be a JSON object, got {type(header).__name__}")
    return header


def error_reply(request_id: Any, err: BaseException) -> dict[str, Any]:
    kind = err.kind if isinstance(err, BusError) else "InternalError"
    return {"id": request_id, "ok": False, "kind": kind, "error": str(err)}


def raise_for_reply(reply: dict[str, Any]) -> None:
    if not reply.get("ok", False):
        cls = ERRORS.get(reply.get("kind", ""), BusError)
        raise cls(reply.get("error", "bus replied with an error and no message"))


# ---------------------------------------------------------------------------------------------------
# Arrow payloads


def encode_batch(batch: pa.RecordBatch) -> pa.Buffer:
    """One IPC stream holding ``batch``. Copies the batch's bytes once (pyarrow has no gather write)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def decode_batch(frame: Any) -> pa.RecordBatch:
    """Decode one payload frame zero-copy; raises ProtocolError for anything but one valid batch.

    ``frame`` is a ``zmq.Frame`` (its memory is kept alive by the returned arrays) or any buffer.
    """
    return read_one_batch(pa.py_buffer(frame.buffer if hasattr(frame, "buffer") else frame), "payload frame")


def read_one_batch(source: Any, what: str) -> pa.RecordBatch:
    """The single record batch of the IPC stream in ``source`` (a buffer or memory map), read in place.

    Full validation is what makes untrusted bytes safe to index later: offsets in bounds, UTF-8 valid.
    """
    try:
        batches = list(pa.ipc.open_stream(source))
        if len(batches) != 1:
            raise ProtocolError(f"{what} must hold exactly one record batch, found {len(batches)}")
        batches[0].validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError, OSError) as e:
        raise ProtocolError(f"{what} is not a valid Arrow IPC stream: {e}") from None
    return batches[0]


def encode_schema(columns: dict[str, pa.DataType]) -> pa.Buffer:
    return pa.schema(list(columns.items())).serialize()


def decode_schema(frame: Any) -> dict[str, pa.DataType]:
    buf = pa.py_buffer(frame.buffer if hasattr(frame, "buffer") else frame)
    try:
        schema = pa.ipc.read_schema(buf)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError, OSError) as e:
        raise ProtocolError(f"schema frame is not a valid Arrow schema: {e}") from None
    return {f.name: f.type for f in schema}
