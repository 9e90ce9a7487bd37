"""Every protobuf wire byte of trainer.v1 written or read by hand, rather than by protobuf.

Large tensors would otherwise be copied several times by protobuf on their way through a message,
so a few messages are written and read here directly: a request whose batch travels spliced after
it (``SplicedRequest``), the server's cut of that batch out of the received bytes (``cut_field``),
tensor stream responses in wire form (``chunk_pieces``, ``Packer``, ``Serialized``) and the SDK's
reader of them (``split_chunk_response``). What they write is the proto's wire form, which any
protobuf parser reads; they read anything a protobuf serialiser writes, and leave layouts they do
not follow to protobuf's own parser. Field numbers come from the generated descriptors.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor

from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

_LEN = 2  # the length-delimited wire type


def _number(field: str, *messages: Descriptor) -> int:
    """The number of ``field``, which each of ``messages`` has under the same number."""
    numbers = {message.fields_by_name[field].number for message in messages}
    if len(numbers) != 1:
        raise RuntimeError(f"{field} has different numbers in {[m.name for m in messages]}")
    return numbers.pop()


# A GetGradients/GetParameters response is ``{chunk: TensorChunk}`` or ``{chunks: [TensorChunk]}``
# (pack_chunks), the two responses alike.
_STREAMS = (pb.GetGradientsResponse.DESCRIPTOR, pb.GetParametersResponse.DESCRIPTOR)
_CHUNK_FIELD = _number("chunk", *_STREAMS)
_CHUNKS_FIELD = _number("chunks", *_STREAMS)
_DATA_FIELD = _number("data", pb.TensorChunk.DESCRIPTOR)


class Serialized:
    """A message already in wire form: the server's serializer sends ``data`` as it is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


# -- a request's batch bytes: spliced after it by the SDK, cut out of it by the server ------------


class SplicedRequest:
    """A request whose one large tensor's bytes travel beside it, serialised with a single copy of
    them: the message as protobuf writes it (that tensor's ``raw_data`` empty), followed by a
    message holding only those bytes at ``path`` (field numbers from the request down to
    ``raw_data``). Protobuf parsers merge the two, so the wire is the proto's; protobuf's own
    setter and serialiser would have copied the bytes twice more."""

    __slots__ = ("message", "path", "raw")

    def __init__(self, message: Any, path: tuple[int, ...], raw: memoryview) -> None:
        self.message = message
        self.path = path
        self.raw = raw

    def serialize(self) -> bytes:
        parts: list[bytes | memoryview] = [self.raw]
        size = self.raw.nbytes
        for number in reversed(self.path):
            head = _varint(number << 3 | _LEN) + _varint(size)
            parts.append(head)
            size += len(head)
        return b"".join([self.message.SerializeToString(), *reversed(parts)])


def raw_input_path(request: type[Any]) -> tuple[tuple[int, ...], tuple[frozenset[int], ...]]:
    """Field numbers from a Forward or TrainStep request down to its input's raw bytes (input,
    tensor, raw_data): where ``SplicedRequest`` puts them and ``cut_field`` takes them out; and at
    each level the other members of the oneof the path's field is in (``cut_field``'s refuse)."""
    fields = (request.DESCRIPTOR.fields_by_name["input"], pb.TensorInput.DESCRIPTOR.fields_by_name["tensor"],
              pb.Tensor.DESCRIPTOR.fields_by_name["raw_data"])
    siblings = tuple(
        frozenset(f.number for f in field.containing_oneof.fields if f is not field) if field.containing_oneof else frozenset()
        for field in fields
    )
    return tuple(f.number for f in fields), siblings


def cut_field(
    data: bytes, path: tuple[int, ...], refuse: tuple[frozenset[int], ...] = (), budget: FieldBudget | None = None
) -> tuple[bytes, memoryview | None]:
    """A serialised message with one length-delimited field taken out, and that field's bytes as a
    view of ``data`` (no copy), or None when it is absent; ``path`` gives the field numbers from the
    message down to the field (``SplicedRequest``'s path). As protobuf reads it: the messages on
    the path may come in several pieces (``SplicedRequest`` sends two), each kept for protobuf to
    merge, and of several occurrences of the field the last wins. ``refuse`` gives, level by level,
    field numbers whose presence makes the cut give up: the other members of a ``oneof`` the path
    goes through (one of them clears the path's member, which this walk does not follow). The rest
    is copied, so it should be small.

    Raises ``ValueError`` where protobuf's reading is left to protobuf: bytes that do not parse, a
    tag or length longer than 5 bytes (which upb refuses), a refused field, a message with more than
    ``MAX_CUT_FIELDS`` fields at one level, or a request with more than ``budget`` fields in all
    levels together (a fresh ``FieldBudget()`` by default: ``MAX_CUT_FIELDS_TOTAL``). This walk is
    Python, run on the server's event loop, so it must stay short whatever a client sends: the
    levels' pieces multiply (64 pieces of the input, each of 64 pieces of the tensor, each of 64
    fields, is 262,144 fields in half a megabyte), so the bound is on the whole request; protobuf's
    C parser reads such a request in milliseconds."""
    budget = FieldBudget() if budget is None else budget
    return _cut(memoryview(data), path, refuse + (frozenset(),) * (len(path) - len(refuse)), budget)


# Far more fields than any Forward or TrainStep request has at one level (they have under ten), and
# in all levels together (the SDK's spliced request has under 20).
MAX_CUT_FIELDS = 64
MAX_CUT_FIELDS_TOTAL = 256


class FieldBudget:
    """The fields one ``cut_field`` may read, all levels together; ``used`` counts those it read."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = MAX_CUT_FIELDS_TOTAL) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise ValueError(f"more than {self.limit} fields in the request")
        self.used += 1


def _cut(
    buf: memoryview, path: tuple[int, ...], refuse: tuple[frozenset[int], ...], budget: FieldBudget
) -> tuple[bytes, memoryview | None]:
    out: list[bytes | memoryview] = []
    found: memoryview | None = None
    pos = 0
    fields = 0
    while pos < len(buf):
        fields += 1
        if fields > MAX_CUT_FIELDS:
            raise ValueError(f"more than {MAX_CUT_FIELDS} fields in one message")
        budget.take()
        start = pos
        key, pos = _read_short_varint(buf, pos)
        if key >> 32 or key >> 3 in refuse[0]:
            raise ValueError("a tag protobuf refuses, or a field that changes what the path holds")
        wire = key & 7
        if wire == _LEN:
            size, pos = _read_short_varint(buf, pos)
            if size >> 31:
                raise ValueError("length too large")
            end = pos + size
            if end > len(buf):
                raise ValueError("truncated field")
            if key >> 3 == path[0]:
                if len(path) == 1:
                    found = buf[pos:end]
                else:
                    inner, deeper = _cut(buf[pos:end], path[1:], refuse[1:], budget)
                    out += [_varint(key), _varint(len(inner)), inner]
                    found = deeper if deeper is not None else found
                pos = end
                continue
            pos = end
        else:
            pos = _past_scalar(buf, pos, wire)
        if pos > len(buf):
            raise ValueError("truncated field")
        out.append(buf[start:pos])
    return b"".join(out), found


# -- tensor stream responses (GetGradients, GetParameters) -----------------------------------------
#
# Building a response with protobuf copies each chunk's data three times on the way out (slice to
# bytes, setter, SerializeToString) and twice on the way in (parse, getter). Written and read here,
# the data is copied once into the message, and read back as a view of the received bytes.


class Fill:
    """``nbytes`` of a response that ``write`` puts straight into their place in it (given a
    writable view of exactly those bytes) instead of being copied from a bytes-like part: a cast,
    say, that writes its result there rather than into a tensor of its own first."""

    __slots__ = ("nbytes", "write")

    def __init__(self, nbytes: int, write: Callable[[memoryview], None]) -> None:
        self.nbytes = nbytes
        self.write = write


class Source:
    """A tensor's wire bytes made as they are written (``Fill``), for ``chunking.encode_chunk_wire``
    in place of a view of bytes that exist already."""

    nbytes: int

    def slice(self, start: int, end: int) -> Fill:
        """Bytes ``start`` to ``end`` of the tensor's wire form."""
        raise NotImplementedError


Part = bytes | memoryview | Fill


class Pieces:
    """A response's wire bytes not yet joined: ``parts`` in order, ``size`` bytes in all. Views of a
    tensor's memory (or ``Fill`` parts that read it) may be among them, so it is joined (``join``,
    ``Packer.flush``) while that memory still holds what it should: the one copy of the data into
    the response happens there."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[Part], size: int) -> None:
        self.parts = parts
        self.size = size

    def join(self) -> Serialized:
        return Serialized(_join(self.parts, self.size))


def _join(parts: list[Part], size: int) -> bytes:
    """``parts`` as one ``bytes`` (what gRPC sends), each byte written once. Without ``Fill`` parts,
    ``bytes.join``. With them, the bytes object is filled in place through ``io.BytesIO``: made
    from zeroed bytes of the right size that nothing else refers to, its buffer is written through
    ``getbuffer`` and returned by ``getvalue`` as it is, with no copy (CPython shares the buffer
    when no view of it is left: ``tests/test_codec.py`` checks that this still holds)."""
    if not any(isinstance(p, Fill) for p in parts):
        return b"".join(parts)  # type: ignore[arg-type]
    out = io.BytesIO(bytes(size))
    with out.getbuffer() as view:
        pos = 0
        for part in parts:
            n = part.nbytes if isinstance(part, (Fill, memoryview)) else len(part)
            if isinstance(part, Fill):
                part.write(view[pos : pos + n])
            else:
                view[pos : pos + n] = part
            pos += n
    if pos != size:
        raise ValueError(f"the parts hold {pos} bytes, not {size}")
    return out.getvalue()


def chunk_pieces(head: pb.TensorChunk, data: memoryview | Fill, packed: bool) -> Pieces:
    """A response carrying one chunk: ``head`` (a ``TensorChunk`` without its data) followed by
    ``data``, not yet copied (or written). ``packed`` puts the chunk in the response's ``chunks`` field instead
    of ``chunk``, ready for a ``Packer``."""
    tag = _varint((_CHUNKS_FIELD if packed else _CHUNK_FIELD) << 3 | _LEN)
    head_bytes = head.SerializeToString()
    size = data.nbytes
    data_head = _varint(_DATA_FIELD << 3 | _LEN) + _varint(size) if size else b""
    length = _varint(len(head_bytes) + len(data_head) + size)
    parts: list[Part] = [tag, length, head_bytes, data_head]
    if size:
        parts.append(data)
    return Pieces(parts, len(tag) + len(length) + len(head_bytes) + len(data_head) + size)


class Packer:
    """Joins responses made with ``packed`` (each one element of ``chunks``) while together they
    stay within ``limit`` bytes: protobuf appends every occurrence of a repeated field, so the
    joined bytes are one response whose ``chunks`` are theirs in order. Each group is joined once,
    straight from its pieces (each chunk's data copied once); a response of ``limit`` bytes or more
    goes alone. One response at a time, so a stream can send what is complete while later tensors
    are still being encoded; the pieces it holds are views, so the last group must be flushed
    before the memory they view changes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._group: list[Part] = []
        self._size = 0

    def add(self, message: Pieces) -> Serialized | None:
        """Takes ``message``; returns the response it completes (the group before it), if any."""
        done = self.flush() if self._group and self._size + message.size > self._limit else None
        self._group += message.parts
        self._size += message.size
        return done

    def flush(self) -> Serialized | None:
        """The response of what was taken and not yet returned, if anything was."""
        if not self._group:
            return None
        group, size, self._group, self._size = self._group, self._size, [], 0
        return Serialized(_join(group, size))


def split_chunk_response(data: bytes) -> list[tuple[pb.TensorChunk, memoryview]]:
    """A GetGradients/GetParameters response from its wire bytes: each chunk it carries (one in
    ``chunk``, or several in ``chunks``) as its fields without its data, and the data as a view of
    ``data`` (no copy). Layouts this reader does not expect (a chunk split over several fields,
    say) go through protobuf's parser instead."""
    buf = memoryview(data)
    try:
        out: list[tuple[pb.TensorChunk, memoryview]] = []
        pos = 0
        single = False
        while pos < len(buf):
            key, pos = _read_varint(buf, pos)
            if key & 7 != _LEN:
                raise ValueError("unexpected wire type")
            size, pos = _read_varint(buf, pos)
            if key >> 3 == _CHUNK_FIELD:
                if single:
                    raise ValueError("chunk field repeated")  # protobuf merges them: let it
                single = True
                out.append(_split_chunk(buf[pos : pos + size]))
            elif key >> 3 == _CHUNKS_FIELD:
                out.append(_split_chunk(buf[pos : pos + size]))
            else:
                raise ValueError("a field this reader does not expect")  # protobuf decides (field 0: refused)
            pos += size
        if pos != len(buf) or (single and len(out) > 1):
            raise ValueError("unexpected layout")
        return out
    except ValueError:
        response = pb.GetGradientsResponse.FromString(data)  # same layout as GetParametersResponse
        chunks = ([response.chunk] if response.HasField("chunk") else []) + list(response.chunks)
        return [(chunk, memoryview(chunk.data)) for chunk in chunks]


def _split_chunk(inner: memoryview) -> tuple[pb.TensorChunk, memoryview]:
    """One serialised ``TensorChunk``: its fields without ``data``, and ``data`` as a view."""
    rest: list[memoryview] = []
    payload = memoryview(b"")
    pos = 0
    while pos < len(inner):
        start = pos
        key, pos = _read_varint(inner, pos)
        wire = key & 7
        if wire == _LEN:
            size, pos = _read_varint(inner, pos)
            pos += size
            if key >> 3 == _DATA_FIELD:
                payload = inner[pos - size : pos]  # the last occurrence wins, as in protobuf
                continue
        else:
            pos = _past_scalar(inner, pos, wire)
        rest.append(inner[start:pos])
    if pos != len(inner):
        raise ValueError("truncated chunk")
    return pb.TensorChunk.FromString(b"".join(rest)), payload


# -- the wire's primitives -----------------------------------------------------------------------


def _past_scalar(buf: memoryview, pos: int, wire: int) -> int:
    """Where a field's value ends, for the wire types with no length: varint, 64-bit, 32-bit."""
    if wire == 0:
        return _read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 5:
        return pos + 4
    raise ValueError("unexpected wire type")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_short_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """A tag or a length: at most 5 bytes, as upb reads them (longer ones it refuses)."""
    value, end = _read_varint(buf, pos)
    if end - pos > 5:
        raise ValueError("varint longer than 5 bytes")
    return value, end


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
