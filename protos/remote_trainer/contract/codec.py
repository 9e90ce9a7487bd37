"""The one codec between numpy arrays and the wire tensors of trainer.v1.

Wire form: shape + data type + raw little-endian row-major bytes (``Tensor``), a list of numbers for
small hand-typed tensors (``TensorValues``), and ``TensorChunk`` pieces of named tensors in streams.
numpy has no bfloat16, so bfloat16 travels as the upper 16 bits of float32 and decodes to float32.
The server uses this module too, so both ends agree byte for byte; it imports neither of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from remote_trainer.contract.names import Distribution, LossName, OptimizerName
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

# Wire data type -> numpy dtype of the raw bytes (bfloat16: its bit pattern).
_WIRE_DTYPES: dict[int, np.dtype] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
}
_NUMPY_TO_WIRE: dict[np.dtype, int] = {
    np.dtype("float32"): pb.DATA_TYPE_FLOAT32,
    np.dtype("float16"): pb.DATA_TYPE_FLOAT16,
    np.dtype("float64"): pb.DATA_TYPE_FLOAT64,
    np.dtype("int64"): pb.DATA_TYPE_INT64,
    np.dtype("int32"): pb.DATA_TYPE_INT32,
}
# Short names used by the SDK and the server's messages.
DATA_TYPE_NAMES: dict[int, str] = {
    pb.DATA_TYPE_FLOAT32: "float32",
    pb.DATA_TYPE_FLOAT16: "float16",
    pb.DATA_TYPE_BFLOAT16: "bfloat16",
    pb.DATA_TYPE_FLOAT64: "float64",
    pb.DATA_TYPE_INT64: "int64",
    pb.DATA_TYPE_INT32: "int32",
}
DATA_TYPES_BY_NAME: dict[str, int] = {name: code for code, name in DATA_TYPE_NAMES.items()}
# The wire enum of each loss function and optimizer kind named in ``names`` (the SDK's and the
# engine's vocabulary), both ways.
LOSS_FUNCTIONS: dict[LossName, pb.LossFunction.ValueType] = {
    "sum": pb.LOSS_FUNCTION_SUM_DIFFERENCE,
    "cross_entropy": pb.LOSS_FUNCTION_CROSS_ENTROPY,
    "mse": pb.LOSS_FUNCTION_MSE,
}
LOSS_NAMES: dict[int, LossName] = {code: name for name, code in LOSS_FUNCTIONS.items()}
OPTIMIZER_KINDS: dict[OptimizerName, pb.OptimizerKind.ValueType] = {
    "sgd": pb.OPTIMIZER_KIND_SGD, "adam": pb.OPTIMIZER_KIND_ADAM, "adamw": pb.OPTIMIZER_KIND_ADAMW,
}
OPTIMIZER_NAMES: dict[int, OptimizerName] = {code: name for name, code in OPTIMIZER_KINDS.items()}
DISTRIBUTIONS: dict[Distribution, pb.Distribution.ValueType] = {
    "zeros": pb.DISTRIBUTION_ZEROS,
    "ones": pb.DISTRIBUTION_ONES,
    "uniform": pb.DISTRIBUTION_UNIFORM,
    "normal": pb.DISTRIBUTION_NORMAL,
    "randint": pb.DISTRIBUTION_RANDINT,
}
DISTRIBUTION_NAMES: dict[int, Distribution] = {code: name for name, code in DISTRIBUTIONS.items()}


class CodecError(ValueError):
    """A wire tensor that cannot be decoded; ``reason`` is an UPPER_SNAKE_CASE constant."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _wire_dtype(data_type: int) -> np.dtype:
    try:
        return _WIRE_DTYPES[data_type]
    except KeyError:
        raise CodecError(f"unknown or unspecified data_type {data_type}", "UNKNOWN_DATA_TYPE") from None


def check_shape(shape: Iterable[int]) -> tuple[int, ...]:
    """The shape as a tuple, refusing negative sizes."""
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise CodecError(f"shape {list(dims)} has a negative size", "NEGATIVE_DIMENSION")
    return dims


def num_elements(shape: Iterable[int]) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    return math.prod(check_shape(shape))


def bf16_bits_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """bfloat16 bit patterns to float32 (exact: bfloat16 is the upper half of float32)."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: a shift of a 0-d array would give a numpy scalar, not an array
    return wide.view(np.float32)


def float32_to_bf16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """float32 to bfloat16 bit patterns, rounding to nearest even as torch does."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))
    bits = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        bits[nan] = np.uint16(0x7FC0)
    return bits


def encode(array: npt.ArrayLike, data_type: int | None = None) -> pb.Tensor:
    """A numpy array (or anything np.asarray takes) as a wire ``Tensor``.

    ``data_type`` BFLOAT16 rounds float32 values to bfloat16; otherwise the array's own dtype is
    sent (bool and other unsupported dtypes are refused).
    """
    tensor = pb.Tensor()
    encode_into(tensor, array, data_type)
    return tensor


def encode_into(tensor: pb.Tensor, array: npt.ArrayLike, data_type: int | None = None) -> None:
    """``encode`` written into a ``Tensor`` that is already part of a request (``request.input.tensor``).

    Filling the request in place saves a copy of the whole tensor: protobuf copies a sub-message
    given to a constructor or to ``CopyFrom``.
    """
    tensor.raw_data = encode_header_into(tensor, array, data_type).tobytes()


def encode_header_into(tensor: pb.Tensor, array: npt.ArrayLike, data_type: int | None = None) -> memoryview:
    """``encode_into`` but for ``raw_data``: sets the shape and data type and returns the bytes
    to send (a view of the array when it is already in wire layout), for ``SplicedRequest``."""
    arr = np.asarray(array)
    if data_type == pb.DATA_TYPE_BFLOAT16:
        raw = np.ascontiguousarray(float32_to_bf16_bits(arr.astype(np.float32, copy=False)))
        wire: int = pb.DATA_TYPE_BFLOAT16
    else:
        found = _NUMPY_TO_WIRE.get(arr.dtype.newbyteorder("=")) if data_type is None else data_type
        if found is None:
            raise CodecError(f"unsupported dtype {arr.dtype}", "UNSUPPORTED_DTYPE")
        wire = found
        raw = np.ascontiguousarray(arr, dtype=_wire_dtype(wire))
    tensor.Clear()
    tensor.shape.extend(arr.shape)
    tensor.data_type = pb.DataType.ValueType(wire)
    return raw.reshape(-1).data.cast("B") if raw.size else memoryview(b"")


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


def encode_raw(raw: bytes, shape: Iterable[int], data_type: int) -> pb.Tensor:
    """A wire ``Tensor`` from bytes already in wire layout."""
    return pb.Tensor(shape=list(shape), data_type=data_type, raw_data=raw)  # type: ignore[arg-type]


def decode(tensor: pb.Tensor, raw: bytes | memoryview | None = None) -> npt.NDArray[np.generic]:
    """A wire ``Tensor`` as a read-only numpy array viewing its bytes (no copy): ``raw``, when its
    ``raw_data`` was cut out of the received message (``cut_field``), else ``raw_data``.

    bfloat16 decodes to float32 (a copy). Raises ``CodecError`` when the byte length does not
    match the shape and data type.
    """
    dtype = _wire_dtype(tensor.data_type)
    shape = check_shape(tensor.shape)
    if raw is None:
        raw = tensor.raw_data
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise CodecError(
            f"raw_data has {len(raw)} bytes, but shape {list(shape)} of "
            f"{DATA_TYPE_NAMES[tensor.data_type]} needs {expected}",
            "BYTE_LENGTH_MISMATCH",
        )
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if tensor.data_type == pb.DATA_TYPE_BFLOAT16:
        return bf16_bits_to_float32(arr)
    return arr


def values_to_array(values: pb.TensorValues, dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
    """A ``TensorValues`` as a numpy array of ``dtype``; integer dtypes need integral values."""
    shape = check_shape(values.shape)
    if math.prod(shape) != len(values.values):
        raise CodecError(
            f"values has {len(values.values)} numbers, but shape {list(shape)} needs {math.prod(shape)}",
            "VALUE_COUNT_MISMATCH",
        )
    data = np.asarray(values.values, dtype=np.float64).reshape(shape)
    target = np.dtype(dtype)
    if target.kind in "iu":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise CodecError("values must be whole numbers for an integer tensor", "NOT_INTEGRAL")
        # 2**63 is exact in float64; anything at or beyond it (or below -2**63) does not fit an int64.
        bound = float(np.iinfo(target).max) + 1
        if data.size and (data.max() >= bound or data.min() < -bound):
            raise CodecError(f"values must fit {target.name}", "VALUE_OUT_OF_RANGE")
    return data.astype(target)


def array_to_values(array: npt.ArrayLike) -> pb.TensorValues:
    """A numpy array as a ``TensorValues`` list of numbers."""
    arr = np.asarray(array)
    return pb.TensorValues(shape=list(arr.shape), values=arr.astype(np.float64).ravel().tolist())


M = TypeVar("M")


def encode_chunks(
    name: str,
    raw: bytes | memoryview | None,
    shape: Iterable[int],
    data_type: int,
    stats: pb.TensorStats | None,
    chunk_bytes: int,
) -> Iterator[pb.TensorChunk]:
    """Splits one named tensor into ``TensorChunk`` messages of at most ``chunk_bytes`` of data.

    ``raw`` None means the tensor is absent (a parameter with no .grad): one chunk says so.
    ``raw`` empty bytes (stats only, or a tensor with no elements) gives one chunk with metadata.
    """
    return encode_chunk_messages(name, raw, shape, data_type, stats, chunk_bytes, pb.TensorChunk, lambda c: c)


def encode_chunk_messages(
    name: str,
    raw: bytes | memoryview | None,
    shape: Iterable[int],
    data_type: int,
    stats: pb.TensorStats | None,
    chunk_bytes: int,
    message: Callable[[], M],
    chunk_of: Callable[[M], pb.TensorChunk],
) -> Iterator[M]:
    """``encode_chunks``, each chunk written in place into a new ``message()`` at ``chunk_of(message)``.

    A stream's response messages are filled directly, rather than wrapping a finished chunk (which
    protobuf would copy); ``raw`` may be a memoryview of the tensor's memory, sliced without a copy.
    """
    dims = list(shape)
    if raw is None:
        msg = message()
        chunk = chunk_of(msg)
        chunk.name, chunk.data_type, chunk.present, chunk.last = name, data_type, False, True  # type: ignore[assignment]
        chunk.shape.extend(dims)
        yield msg
        return
    view = memoryview(raw).cast("B")
    total = view.nbytes
    offset = 0
    first = True
    while first or offset < total:
        end = min(offset + chunk_bytes, total)
        msg = message()
        chunk = chunk_of(msg)
        chunk.name, chunk.offset, chunk.last = name, offset, end >= total
        chunk.data = view[offset:end].tobytes()
        if first:
            chunk.shape.extend(dims)
            chunk.data_type = data_type  # type: ignore[assignment]
            chunk.present = True
            chunk.total_bytes = total
            if stats is not None:
                chunk.stats.CopyFrom(stats)
        yield msg
        offset = end
        first = False


# -- chunk messages in wire form, without copying their data twice ------------------------------
#
# A GetGradients/GetParameters response is ``{chunk = 1: TensorChunk{..., data = 8: bytes, ...}}``.
# Building it with protobuf copies each chunk's data three times on the way out (slice to bytes,
# setter, SerializeToString) and twice on the way in (parse, getter). The functions below write
# and read the same wire bytes directly: the data is copied once into the message, and read back
# as a view of the received bytes. Any protobuf parser reads what they write; they read anything a
# protobuf serialiser writes (an unusual layout falls back to protobuf's own parser).

_CHUNK_FIELD = 1  # GetGradientsResponse.chunk and GetParametersResponse.chunk
_CHUNKS_FIELD = 2  # GetGradientsResponse.chunks and GetParametersResponse.chunks (pack_chunks)
_DATA_FIELD = 8  # TensorChunk.data
_LEN = 2  # the length-delimited wire type


class Serialized:
    """A message already in wire form: the server's serializer sends ``data`` as it is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


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
    data: bytes, path: tuple[int, ...], refuse: tuple[frozenset[int], ...] = ()
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
    tag or length longer than 5 bytes (which upb refuses), a refused field, or a message with more
    than ``MAX_CUT_FIELDS`` fields at one level (this walk is Python, run on the server's event
    loop, so it must stay short whatever a client sends; protobuf's C parser reads such a request)."""
    return _cut(memoryview(data), path, refuse + (frozenset(),) * (len(path) - len(refuse)))


# Far more fields than any Forward or TrainStep request has at one level (they have under ten).
MAX_CUT_FIELDS = 64


def _cut(buf: memoryview, path: tuple[int, ...], refuse: tuple[frozenset[int], ...]) -> tuple[bytes, memoryview | None]:
    out: list[bytes | memoryview] = []
    found: memoryview | None = None
    pos = 0
    fields = 0
    while pos < len(buf):
        fields += 1
        if fields > MAX_CUT_FIELDS:
            raise ValueError(f"more than {MAX_CUT_FIELDS} fields in one message")
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
                    inner, deeper = _cut(buf[pos:end], path[1:], refuse[1:])
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


def encode_chunk_wire(
    name: str,
    raw: bytes | memoryview | None,
    shape: Iterable[int],
    data_type: int,
    stats: pb.TensorStats | None,
    chunk_bytes: int,
    packed: bool = False,
) -> list[Serialized]:
    """``encode_chunk_messages`` for GetGradients/GetParameters responses, in wire form: each
    chunk's data is copied once, from ``raw`` (a view of the tensor's memory) into its message.
    ``packed`` puts each chunk in the response's ``chunks`` field instead of ``chunk``, ready for a
    ``Packer``."""
    tag = _varint((_CHUNKS_FIELD if packed else _CHUNK_FIELD) << 3 | _LEN)
    if raw is None:  # an absent tensor: one chunk that says so
        absent = next(iter(encode_chunks(name, None, shape, data_type, None, chunk_bytes))).SerializeToString()
        return [Serialized(b"".join([tag, _varint(len(absent)), absent]))]
    out = []
    view = memoryview(raw).cast("B")
    total = view.nbytes
    offset = 0
    first = True
    while first or offset < total:
        end = min(offset + chunk_bytes, total)
        chunk = pb.TensorChunk(name=name, offset=offset, last=end >= total)
        if first:
            chunk.shape.extend(shape)
            chunk.data_type = data_type  # type: ignore[assignment]
            chunk.present = True
            chunk.total_bytes = total
            if stats is not None:
                chunk.stats.CopyFrom(stats)
        head_bytes = chunk.SerializeToString()
        size = end - offset
        data_head = _varint(_DATA_FIELD << 3 | _LEN) + _varint(size) if size else b""
        inner_len = len(head_bytes) + len(data_head) + size
        parts: list[bytes | memoryview] = [tag, _varint(inner_len), head_bytes, data_head]
        if size:
            parts.append(view[offset:end])
        out.append(Serialized(b"".join(parts)))
        offset = end
        first = False
    return out


class Packer:
    """Joins responses made with ``packed`` (each one element of ``chunks``) while together they
    stay within ``limit`` bytes: protobuf appends every occurrence of a repeated field, so the
    joined bytes are one response whose ``chunks`` are theirs in order. A response of ``limit``
    bytes or more goes alone and is not copied. One response at a time, so a stream can send
    what is complete while later tensors are still being encoded."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._group: list[bytes] = []
        self._size = 0

    def add(self, message: Serialized) -> Serialized | None:
        """Takes ``message``; returns the response it completes (the group before it), if any."""
        done = self.flush() if self._group and self._size + len(message.data) > self._limit else None
        self._group.append(message.data)
        self._size += len(message.data)
        return done

    def flush(self) -> Serialized | None:
        """The response of what was taken and not yet returned, if anything was."""
        if not self._group:
            return None
        group, self._group, self._size = self._group, [], 0
        return Serialized(group[0] if len(group) == 1 else b"".join(group))


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


@dataclass
class AssembledTensor:
    """One named tensor put together from its chunks."""

    name: str
    shape: tuple[int, ...]
    data_type: int
    present: bool
    stats: pb.TensorStats | None
    array: npt.NDArray[np.generic] | None


def assemble_chunks(chunks: Iterable[pb.TensorChunk], with_data: bool = True) -> Iterator[AssembledTensor]:
    """Puts ``TensorChunk`` streams back together, yielding each tensor when its last chunk arrives.

    ``with_data`` False is for a stats-only stream: tensors come with ``array`` None.
    """
    # Each read of a bytes field copies it: read once.
    return assemble_split_chunks(((c, c.data) for c in chunks), with_data)


def assemble_split_chunks(
    chunks: Iterable[tuple[pb.TensorChunk, bytes | memoryview]], with_data: bool = True
) -> Iterator[AssembledTensor]:
    """``assemble_chunks`` of chunks whose data comes beside them (``split_chunk_response``): each
    tensor's bytes are written straight into one array allocated for it from its first chunk."""
    current: pb.TensorChunk | None = None
    buffer = np.empty(0, np.uint8)
    received = 0
    for chunk, data in chunks:
        if current is None or chunk.offset == 0 and chunk.name != current.name:
            current = chunk
            buffer = np.empty(chunk.total_bytes, np.uint8)
            received = 0
        elif chunk.name != current.name:
            raise CodecError(f"chunk of {chunk.name!r} arrived inside {current.name!r}", "CHUNK_ORDER")
        if chunk.offset != received or received + len(data) > len(buffer):
            raise CodecError(f"chunk of {chunk.name!r} at offset {chunk.offset} is out of order", "CHUNK_ORDER")
        buffer[received : received + len(data)] = np.frombuffer(data, np.uint8)
        received += len(data)
        if not chunk.last:
            continue
        head = current
        current = None
        stats = head.stats if head.HasField("stats") else None
        shape = tuple(int(d) for d in head.shape)
        array: npt.NDArray[np.generic] | None = None
        if head.present and with_data:
            if received != head.total_bytes:
                raise CodecError(f"tensor {head.name!r} ended after {received} of {head.total_bytes} bytes", "CHUNK_ORDER")
            dtype = _wire_dtype(head.data_type)
            array = buffer.view(dtype).reshape(shape)
            if head.data_type == pb.DATA_TYPE_BFLOAT16:
                array = bf16_bits_to_float32(array)  # type: ignore[arg-type]
        yield AssembledTensor(head.name, shape, head.data_type, head.present, stats, array)
    if current is not None:  # a stream that stops inside a tensor must not look like a shorter answer
        raise CodecError(
            f"the stream ended inside tensor {current.name!r} after {received} of {current.total_bytes} bytes", "STREAM_TRUNCATED"
        )
