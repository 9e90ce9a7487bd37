"""The one codec between numpy arrays and the wire tensors of trainer.v1, and between the names
both sides use (``names``) and the wire's enums.

Wire form: shape + data type + raw little-endian row-major bytes (``Tensor``), and a list of numbers
for small hand-typed tensors (``TensorValues``); named tensors in streams are ``chunking``'s.
numpy has no bfloat16, so bfloat16 travels as the upper 16 bits of float32 and decodes to float32.
The server uses this module too, so both ends agree byte for byte; it imports neither of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from remote_trainer.contract.names import Distribution, LossName, OptimizerName
from remote_trainer.contract.reasons import require
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

# Wire data type -> numpy dtype of the raw bytes (bfloat16: its bit pattern).
_WIRE_DTYPES: dict[int, np.dtype] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_INT16: np.dtype("<i2"),
}
_NUMPY_TO_WIRE: dict[np.dtype, int] = {
    np.dtype("float32"): pb.DATA_TYPE_FLOAT32,
    np.dtype("float16"): pb.DATA_TYPE_FLOAT16,
    np.dtype("float64"): pb.DATA_TYPE_FLOAT64,
    np.dtype("int64"): pb.DATA_TYPE_INT64,
    np.dtype("int32"): pb.DATA_TYPE_INT32,
    np.dtype("uint8"): pb.DATA_TYPE_UINT8,
    np.dtype("int16"): pb.DATA_TYPE_INT16,
}
# Short names used by the SDK and the server's messages.
DATA_TYPE_NAMES: dict[int, str] = {
    pb.DATA_TYPE_FLOAT32: "float32",
    pb.DATA_TYPE_FLOAT16: "float16",
    pb.DATA_TYPE_BFLOAT16: "bfloat16",
    pb.DATA_TYPE_FLOAT64: "float64",
    pb.DATA_TYPE_INT64: "int64",
    pb.DATA_TYPE_INT32: "int32",
    pb.DATA_TYPE_UINT8: "uint8",
    pb.DATA_TYPE_INT16: "int16",
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
    """A wire tensor that cannot be decoded; ``reason`` is one of the catalogue's (``reasons``)."""

    def __init__(self, message: str, reason: str) -> None:
        require(reason)
        super().__init__(message)
        self.reason = reason


def raw_dtype(data_type: int) -> np.dtype:
    """The numpy dtype of a wire data type's raw bytes (bfloat16: its bit patterns, ``uint16``)."""
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


def narrowest_integers(array: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
    """Integers (class indices) in the narrowest wire type that holds every one of them: uint8 below
    256, else int16, int32 or int64 (the receiver widens them back; nothing is lost)."""
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return array.astype(dtype)
    return array.astype(np.int64)


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
    to send (a view of the array when it is already in wire layout), for ``wire.SplicedRequest``."""
    arr = np.asarray(array)
    if data_type == pb.DATA_TYPE_BFLOAT16:
        raw = np.ascontiguousarray(float32_to_bf16_bits(arr.astype(np.float32, copy=False)))
        wire: int = pb.DATA_TYPE_BFLOAT16
    else:
        found = _NUMPY_TO_WIRE.get(arr.dtype.newbyteorder("=")) if data_type is None else data_type
        if found is None:
            raise CodecError(f"unsupported dtype {arr.dtype}", "UNSUPPORTED_DTYPE")
        wire = found
        raw = np.ascontiguousarray(arr, dtype=raw_dtype(wire))
    tensor.Clear()
    tensor.shape.extend(arr.shape)
    tensor.data_type = pb.DataType.ValueType(wire)
    return raw.reshape(-1).data.cast("B") if raw.size else memoryview(b"")


def encode_raw(raw: bytes, shape: Iterable[int], data_type: int) -> pb.Tensor:
    """A wire ``Tensor`` from bytes already in wire layout."""
    return pb.Tensor(shape=list(shape), data_type=data_type, raw_data=raw)  # type: ignore[arg-type]


def decode(tensor: pb.Tensor, raw: bytes | memoryview | None = None) -> npt.NDArray[np.generic]:
    """A wire ``Tensor`` as a read-only numpy array viewing its bytes (no copy): ``raw``, when its
    ``raw_data`` was cut out of the received message (``wire.cut_field``), else ``raw_data``.

    bfloat16 decodes to float32 (a copy). Raises ``CodecError`` when the byte length does not
    match the shape and data type.
    """
    dtype = raw_dtype(tensor.data_type)
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
