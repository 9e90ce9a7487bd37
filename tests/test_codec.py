"""The wire codec, shared by the SDK and the server: round trips and refusals."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
import torch
from google.protobuf.message import DecodeError

from remote_trainer.contract import chunking, codec, wire
from remote_trainer.server import convert
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int32, np.int16, np.uint8])
def test_round_trip_keeps_values_and_layout(dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) * 1.5).astype(dtype)
    msg = codec.encode(array)
    assert msg.raw_data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()  # little-endian, row-major
    np.testing.assert_array_equal(codec.decode(msg), array)


def test_non_contiguous_and_big_endian_arrays_are_sent_row_major_little_endian() -> None:
    array = np.arange(12, dtype=">f4").reshape(3, 4).T
    np.testing.assert_array_equal(codec.decode(codec.encode(array)), array)


def test_decode_is_a_view_without_copy() -> None:
    msg = codec.encode(np.ones((64, 64), np.float32))
    assert not codec.decode(msg).flags.owndata


def test_bfloat16_matches_torch_rounding() -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1000
    ours = codec.decode(codec.encode(values.numpy(), pb.DATA_TYPE_BFLOAT16))
    np.testing.assert_array_equal(ours, values.to(torch.bfloat16).float().numpy())
    server_side = convert.output_tensor(values.to(torch.bfloat16))
    np.testing.assert_array_equal(codec.decode(server_side), ours)


def test_uint8_images_travel_as_one_byte_each_and_decode_to_torch_uint8() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)
    msg = codec.encode(images)
    assert (msg.data_type, len(msg.raw_data)) == (pb.DATA_TYPE_UINT8, images.size)
    tensor, _ = convert.input_tensor(pb.TensorInput(tensor=msg), "input", 10**6)
    assert tensor.dtype == torch.uint8 and torch.equal(tensor, torch.from_numpy(images))
    assert codec.DATA_TYPE_NAMES[pb.DATA_TYPE_UINT8] == "uint8" and codec.DATA_TYPE_NAMES[pb.DATA_TYPE_INT16] == "int16"


@pytest.mark.parametrize(("largest", "dtype"), [(0, np.uint8), (255, np.uint8), (256, np.int16), (32767, np.int16),
                                                (32768, np.int32), (2**31 - 1, np.int32), (2**31, np.int64)])
def test_class_indices_travel_in_the_narrowest_integer_type(largest: int, dtype: type) -> None:
    indices = np.array([0, largest, 1], np.int64)
    narrow = codec.narrowest_integers(indices)
    assert narrow.dtype == dtype
    np.testing.assert_array_equal(codec.decode(codec.encode(narrow)).astype(np.int64), indices)  # nothing lost
    assert codec.narrowest_integers(np.array([-1, 3])).dtype == np.int16  # a negative index still travels (and is refused)
    assert codec.narrowest_integers(np.array([], np.int64)).dtype == np.uint8


def test_wrong_byte_length_is_refused() -> None:
    with pytest.raises(codec.CodecError) as err:
        codec.decode(pb.Tensor(shape=[2, 2], data_type=pb.DATA_TYPE_FLOAT32, raw_data=b"\0" * 15))
    assert err.value.reason == "BYTE_LENGTH_MISMATCH"


def test_bool_arrays_are_refused() -> None:
    with pytest.raises(codec.CodecError):
        codec.encode(np.zeros(3, bool))


def test_values_to_integers_must_be_whole() -> None:
    values = pb.TensorValues(shape=[3], values=[1, 2, 3])
    assert codec.values_to_array(values, np.int64).dtype == np.int64
    with pytest.raises(codec.CodecError):
        codec.values_to_array(pb.TensorValues(shape=[1], values=[0.5]), np.int64)


def _protobuf_chunks(name: str, data: bytes | None, shape: tuple[int, ...], stats: pb.TensorStats | None = None) -> list[pb.TensorChunk]:
    """What a stream of float32 chunks of at most 4096 bytes holds, built with protobuf: the
    reference the codec's hand-written chunks are checked against."""
    if data is None:  # an absent tensor: one chunk that says so
        return [pb.TensorChunk(name=name, shape=shape, data_type=pb.DATA_TYPE_FLOAT32, last=True)]
    starts = range(0, max(len(data), 1), 4096)
    chunks = [pb.TensorChunk(name=name, offset=s, data=data[s : s + 4096], last=s + 4096 >= len(data)) for s in starts]
    chunks[0].MergeFrom(pb.TensorChunk(shape=shape, data_type=pb.DATA_TYPE_FLOAT32, present=True, total_bytes=len(data)))
    if stats is not None:
        chunks[0].stats.CopyFrom(stats)
    return chunks


@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 4097, 10_000])
def test_chunks_reassemble(size: int) -> None:
    array = np.arange(size, dtype=np.float32)
    stats = pb.TensorStats(norm=1.0)
    sent = chunking.encode_chunk_wire("w", memoryview(array).cast("B"), array.shape, pb.DATA_TYPE_FLOAT32, stats, 4096)
    sent += chunking.encode_chunk_wire("g", None, (3,), pb.DATA_TYPE_FLOAT32, None, 4096)
    chunks = [c for s in sent for c in wire.split_chunk_response(s.join().data)]
    assert all(len(data) <= 4096 for _, data in chunks) and chunks[-2][0].last
    out = list(chunking.assemble_split_chunks(chunks))
    assert [t.name for t in out] == ["w", "g"]
    np.testing.assert_array_equal(out[0].array, array)
    assert out[0].stats == stats
    assert not out[1].present and out[1].array is None


def test_out_of_order_chunks_are_refused() -> None:
    chunks = [(c, c.data) for c in _protobuf_chunks("w", b"\0" * 8192, (2048,))]
    with pytest.raises(codec.CodecError):
        list(chunking.assemble_split_chunks([chunks[0], chunks[0], chunks[1]]))


@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 4097, 10_000])
def test_wire_chunks_are_the_protobuf_messages_and_read_back(size: int) -> None:
    """Chunks written in wire form parse with protobuf into the very messages protobuf would
    build, and the SDK's reader gets the same chunks back from protobuf's own bytes."""
    array = np.arange(size, dtype=np.float32)
    stats = pb.TensorStats(norm=1.0, num_elements=size)
    sent = chunking.encode_chunk_wire("w", memoryview(array).cast("B"), array.shape, pb.DATA_TYPE_FLOAT32, stats, 4096)
    sent += chunking.encode_chunk_wire("g", None, (3,), pb.DATA_TYPE_FLOAT32, None, 4096)
    expected = [
        pb.GetGradientsResponse(chunk=c) for c in [*_protobuf_chunks("w", array.tobytes(), array.shape, stats), *_protobuf_chunks("g", None, (3,))]
    ]
    assert [pb.GetGradientsResponse.FromString(w.join().data) for w in sent] == expected
    for message in expected:
        [(chunk, data)] = wire.split_chunk_response(message.SerializeToString())
        assert bytes(data) == message.chunk.data
        chunk.data = bytes(data)
        assert chunk == message.chunk
    out = list(chunking.assemble_split_chunks(c for w in sent for c in wire.split_chunk_response(w.join().data)))
    np.testing.assert_array_equal(out[0].array, array)
    assert out[0].stats == stats and not out[1].present


@pytest.mark.parametrize("limit", [1, 100, 4096, 1 << 20])
def test_packed_chunks_are_the_protobuf_messages_and_read_back(limit: int) -> None:
    """With pack_chunks, consecutive chunks share responses up to the limit: each response parses
    with protobuf into ``chunks`` holding exactly the chunks of the unpacked stream, in order, and
    the SDK's reader gets the same tensors back; a response at the limit is sent as it is."""
    tensors = [np.arange(n, dtype=np.float32) for n in (3000, 1, 0, 40, 2000)]
    sent: list[wire.Pieces] = []
    expected: list[pb.TensorChunk] = []
    for i, t in enumerate(tensors):
        raw = memoryview(t).cast("B")
        sent += chunking.encode_chunk_wire(f"t{i}", raw, t.shape, pb.DATA_TYPE_FLOAT32, None, 4096, packed=True)
        expected += _protobuf_chunks(f"t{i}", t.tobytes(), t.shape)
    sent += chunking.encode_chunk_wire("absent", None, (3,), pb.DATA_TYPE_FLOAT32, None, 4096, packed=True)
    expected += _protobuf_chunks("absent", None, (3,))
    packer = wire.Packer(limit)
    packed = [p for p in [*map(packer.add, sent), packer.flush()] if p is not None]
    responses = [pb.GetGradientsResponse.FromString(p.data) for p in packed]
    assert [c for r in responses for c in r.chunks] == expected and not any(r.HasField("chunk") for r in responses)
    assert all(len(p.data) <= limit or len(r.chunks) == 1 for p, r in zip(packed, responses))
    for a, b in zip(packed, responses[1:]):  # each response as full as the limit allows
        assert len(a.data) + len(pb.GetGradientsResponse(chunks=b.chunks[:1]).SerializeToString()) > limit
    assert len(packed) == {1: len(sent), 1 << 20: 1}.get(limit, len(packed))
    out = list(chunking.assemble_split_chunks(c for p in packed for c in wire.split_chunk_response(p.data)))
    assert [t.name for t in out] == ["t0", "t1", "t2", "t3", "t4", "absent"]
    for t, got in zip(tensors, out):
        np.testing.assert_array_equal(got.array, t)


def test_unusual_wire_layouts_fall_back_to_protobuf() -> None:
    # Two chunk fields in one message: protobuf merges them (the data of the second wins).
    a = pb.GetGradientsResponse(chunk=pb.TensorChunk(name="w", data=b"ab", total_bytes=2)).SerializeToString()
    b = pb.GetGradientsResponse(chunk=pb.TensorChunk(data=b"cd")).SerializeToString()
    [(chunk, data)] = wire.split_chunk_response(a + b)
    assert (chunk.name, bytes(data), chunk.total_bytes) == ("w", b"cd", 2)
    # The data field twice inside one chunk: the last wins, as in protobuf.
    twice = pb.TensorChunk(data=b"xy").SerializeToString() + pb.TensorChunk(name="v", data=b"z").SerializeToString()
    [(chunk, data)] = wire.split_chunk_response(b"\x0a" + bytes([len(twice)]) + twice)
    assert (chunk.name, bytes(data)) == ("v", b"z")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One field in wire form; a length-delimited one (wire type 2) gets its length."""
    return _varint(number << 3 | wire_type) + (_varint(len(payload)) if wire_type == 2 else b"") + payload


# Fields of a newer version of the contract, one of each wire type: protobuf keeps them as unknown
# fields, and the codec's readers must step over them exactly.
UNKNOWN = (_field(1000, 0, _varint(300)) + _field(1001, 1, bytes(range(8))) + _field(1002, 5, bytes(range(4)))
           + _field(1003, 2, b"new"))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (0, 3, 4, 4), ()])
def test_a_spliced_request_parses_as_the_whole_message(shape: tuple[int, ...]) -> None:
    array = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    whole = pb.ForwardRequest(session_id="s", eval_mode=True)
    codec.encode_into(whole.input.tensor, array)
    header = pb.ForwardRequest(session_id="s", eval_mode=True)
    raw = codec.encode_header_into(header.input.tensor, array)
    spliced = wire.SplicedRequest(header, (2, 1, 3), raw).serialize()
    assert pb.ForwardRequest.FromString(spliced) == whole


def _without_raw(message: pb.ForwardRequest) -> pb.ForwardRequest:
    copy = pb.ForwardRequest()
    copy.CopyFrom(message)
    if copy.input.HasField("tensor"):
        copy.input.tensor.raw_data = b""
    return copy


# ForwardRequest.input, TensorInput.tensor, Tensor.raw_data; and TensorInput's other oneof members
FORWARD_PATH = convert.INPUT_PATHS["Forward"]


def test_unknown_fields_of_every_wire_type_are_stepped_over() -> None:
    chunk_field = pb.GetGradientsResponse.DESCRIPTOR.fields_by_name["chunk"].number
    chunk = UNKNOWN + pb.TensorChunk(name="w", data=b"abcd", total_bytes=4).SerializeToString() + UNKNOWN
    data = _field(chunk_field, 2, chunk)
    [(got, view)] = wire.split_chunk_response(data)
    expected = pb.GetGradientsResponse.FromString(data).chunk
    assert (got.name, got.total_bytes, bytes(view)) == (expected.name, expected.total_bytes, expected.data)
    assert view.obj is data  # read by the codec's own walk, not protobuf's fallback

    array = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    tensor = UNKNOWN + codec.encode(array).SerializeToString() + UNKNOWN
    input_field, tensor_field, _ = FORWARD_PATH[0]
    request = UNKNOWN + _field(input_field, 2, UNKNOWN + _field(tensor_field, 2, tensor) + UNKNOWN) + UNKNOWN
    expected_request = pb.ForwardRequest.FromString(request)
    rest, raw = wire.cut_field(request, *FORWARD_PATH)
    assert raw is not None and raw.obj is request and bytes(raw) == expected_request.input.tensor.raw_data
    np.testing.assert_array_equal(codec.decode(pb.ForwardRequest.FromString(rest).input.tensor, raw), array)


@pytest.mark.parametrize("how", ["spliced", "protobuf", "values", "raw twice", "no input"])
def test_the_servers_cut_reads_a_request_as_protobuf_does(how: str) -> None:
    """``cut_field`` (how the server takes a batch's bytes out of Forward/TrainStep requests without
    copying them): the rest parses into the message protobuf reads from the whole bytes, less the
    raw bytes, which come out equal to protobuf's ``raw_data`` (the last occurrence winning)."""
    array = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    whole = pb.ForwardRequest(session_id="s", eval_mode=True)
    if how == "spliced":
        header = pb.ForwardRequest(session_id="s", eval_mode=True)
        data = wire.SplicedRequest(header, FORWARD_PATH[0], codec.encode_header_into(header.input.tensor, array)).serialize()
    elif how == "values":
        whole.input.values.shape.extend([2])
        whole.input.values.values.extend([1.0, 2.0])
        data = whole.SerializeToString()
    elif how == "no input":
        data = whole.SerializeToString()
    else:
        codec.encode_into(whole.input.tensor, array)
        data = whole.SerializeToString()
        if how == "raw twice":  # a second piece of the input whose raw bytes replace the first's
            data += pb.ForwardRequest(input=pb.TensorInput(tensor=pb.Tensor(raw_data=b"later"))).SerializeToString()
    expected = pb.ForwardRequest.FromString(data)
    if how == "values":  # another member of the input's oneof: left to protobuf (see below)
        with pytest.raises(ValueError):
            wire.cut_field(data, *FORWARD_PATH)
        return
    rest, raw = wire.cut_field(data, *FORWARD_PATH)
    assert pb.ForwardRequest.FromString(rest) == _without_raw(expected)
    if expected.input.HasField("tensor"):
        assert raw is not None and bytes(raw) == expected.input.tensor.raw_data
        assert raw.obj is data  # a view of the received bytes, not a copy
    else:
        assert raw is None
    if how in ("spliced", "protobuf"):
        np.testing.assert_array_equal(codec.decode(pb.ForwardRequest.FromString(rest).input.tensor, raw), array)


@pytest.mark.parametrize("level", range(len(FORWARD_PATH[0])))
def test_the_servers_cut_walks_a_bounded_number_of_fields(level: int) -> None:
    """The cut runs in Python on the server's event loop: a request made of millions of tiny fields
    (which protobuf's C parser reads at once) is left to protobuf after at most MAX_CUT_FIELDS fields
    per message, instead of walking them all while every other call waits. At each level the cut
    walks (the request, its TensorInput, its Tensor), MAX_CUT_FIELDS fields are read as protobuf
    reads them and one more, or a million, are refused."""
    path = FORWARD_PATH[0]

    def request_with(fields: int) -> bytes:
        # ``fields`` empty pieces of the path's own field at ``level``, inside one piece of each level above.
        data = _piece(path[level], b"") * fields
        for number in reversed(path[:level]):
            data = _piece(number, data)
        return data

    at_the_bound = request_with(wire.MAX_CUT_FIELDS)
    rest, raw = wire.cut_field(at_the_bound, *FORWARD_PATH)
    expected = pb.ForwardRequest.FromString(at_the_bound)
    assert pb.ForwardRequest.FromString(rest) == _without_raw(expected)
    assert (bytes(raw) if raw is not None else b"") == expected.input.tensor.raw_data
    for fields in (wire.MAX_CUT_FIELDS + 1, 1_000_000):
        data = request_with(fields)
        with pytest.raises(ValueError, match="fields in one message"):
            wire.cut_field(data, *FORWARD_PATH)
        assert pb.ForwardRequest.FromString(data) == expected  # what the server then reads instead


def _piece(number: int, payload: bytes) -> bytes:
    return wire._varint(number << 3 | 2) + wire._varint(len(payload)) + payload


def nested_forward(pieces: int = 64, fields: int = 62) -> tuple[bytes, np.ndarray]:
    """A valid Forward request of a (1, 3, 8, 8) batch whose input comes in ``pieces`` pieces, each
    holding ``pieces`` pieces of its tensor of ``fields`` data_type fields (the levels multiply: half
    a megabyte of 262,144 fields), the batch itself in the last piece; and that batch."""
    input_field, tensor_field, _ = FORWARD_PATH[0][:3]
    dtype_field = pb.Tensor.DESCRIPTOR.fields_by_name["data_type"].number
    filler = (wire._varint(dtype_field << 3) + wire._varint(pb.DATA_TYPE_FLOAT32)) * fields
    one_input = _piece(tensor_field, filler) * pieces
    array = np.arange(3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)
    batch = pb.ForwardRequest(eval_mode=True)
    codec.encode_into(batch.input.tensor, array)
    return _piece(input_field, one_input) * pieces + batch.SerializeToString(), array


def test_the_servers_cut_walks_a_bounded_number_of_fields_in_the_whole_request() -> None:
    """Pieces at each level multiply: 64 pieces of the input, each of 64 pieces of its tensor, each
    of 62 fields, stay within the bound per message but are 262,144 fields in all, which the cut
    (Python, on the event loop) once walked field by field. It stops after MAX_CUT_FIELDS_TOTAL of
    them (counted by its budget) and leaves the request to protobuf, which reads it whole."""
    data, array = nested_forward()
    budget = wire.FieldBudget()
    with pytest.raises(ValueError, match="fields in the request"):
        wire.cut_field(data, *FORWARD_PATH, budget=budget)
    assert budget.used == wire.MAX_CUT_FIELDS_TOTAL
    parsed = pb.ForwardRequest.FromString(data)  # what the server reads instead
    np.testing.assert_array_equal(codec.decode(parsed.input.tensor), array)
    # The SDK's own layout stays far within the budget.
    header = pb.ForwardRequest(session_id="s", eval_mode=True, operation=pb.Operation(number=3, client="c"))
    spliced = wire.SplicedRequest(header, FORWARD_PATH[0], codec.encode_header_into(header.input.tensor, array)).serialize()
    budget = wire.FieldBudget()
    rest, raw = wire.cut_field(spliced, *FORWARD_PATH, budget=budget)
    assert raw is not None and budget.used < 20


def test_the_servers_cut_leaves_what_it_does_not_follow_to_protobuf() -> None:
    """Layouts where protobuf's reading turns on rules the cut does not follow are refused
    (ValueError), so the server lets protobuf parse them: another member of TensorInput's oneof
    between two pieces of ``tensor`` (it clears the first piece's bytes), and tags or lengths longer
    than 5 bytes (which upb refuses)."""
    with_raw = _piece(1, _piece(3, b"XXXX"))  # TensorInput.tensor{raw_data: "XXXX"}
    shape_only = _piece(1, b"\x08\x04")  # TensorInput.tensor{shape: [4]}
    for between in (_piece(2, b""), _piece(3, b"")):  # values{}, generate{}
        for data in (_piece(2, with_raw) + _piece(2, between) + _piece(2, shape_only), _piece(2, with_raw + between + shape_only)):
            assert pb.ForwardRequest.FromString(data).input.tensor.raw_data == b""  # protobuf: the bytes are gone
            with pytest.raises(ValueError):
                wire.cut_field(data, *FORWARD_PATH)
    six_byte_tag = bytes([0x80 | (3 << 3 | 2), 0x80, 0x80, 0x80, 0x80, 0x00])
    data = _piece(2, _piece(1, six_byte_tag + b"\x04YYYY"))
    with pytest.raises(DecodeError):
        pb.ForwardRequest.FromString(data)
    with pytest.raises(ValueError):
        wire.cut_field(data, *FORWARD_PATH)


# -- the one fuzz target of the hand-written wire code ------------------------------------------------

def _chunk_without_data(chunk: pb.TensorChunk) -> tuple[bytes, bytes]:
    fields = pb.TensorChunk()
    fields.CopyFrom(chunk)
    fields.ClearField("data")
    return fields.SerializeToString(deterministic=True), bytes(chunk.data)


def _mutated(draw: st.DrawFn, good: bytes) -> bytes:
    """``good`` with a few bytes overwritten, inserted or cut, and perhaps truncated."""
    data = bytearray(good)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        how = draw(st.sampled_from(["set", "insert", "delete"]))
        if how == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif data:
            del data[at]
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


@st.composite
def _request_bytes(draw: st.DrawFn) -> bytes:
    request = pb.ForwardRequest(session_id=draw(st.text(max_size=4)), eval_mode=draw(st.booleans()))
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=4))
    codec.encode_into(request.input.tensor, np.ones(shape, dtype=np.float32))
    return _mutated(draw, request.SerializeToString())


@st.composite
def _response_bytes(draw: st.DrawFn) -> bytes:
    def chunk() -> pb.TensorChunk:
        return pb.TensorChunk(name=draw(st.sampled_from(["fc.weight", "conv1.weight", ""])),
                              shape=draw(st.lists(st.integers(0, 4), max_size=3)), present=draw(st.booleans()),
                              offset=draw(st.integers(0, 64)), data=draw(st.binary(max_size=16)), last=draw(st.booleans()))
    response = pb.GetGradientsResponse()
    if draw(st.booleans()):
        response.chunk.CopyFrom(chunk())
    response.chunks.extend(chunk() for _ in range(draw(st.integers(0, 3))))
    return _mutated(draw, response.SerializeToString())


@settings(max_examples=1000, deadline=None, database=None)
@given(data=_request_bytes())
def test_fuzz_the_servers_cut_reads_any_bytes_as_protobuf_does(data: bytes) -> None:
    """contract.wire.cut_field on valid, damaged and cut requests: it refuses (ValueError: the server
    lets protobuf decide) or reads exactly what protobuf reads, the batch's bytes included."""
    try:
        expected: pb.ForwardRequest | None = pb.ForwardRequest.FromString(data)
    except DecodeError:
        expected = None
    try:
        rest, raw = wire.cut_field(data, *FORWARD_PATH)
    except ValueError:
        return
    if expected is None:
        with pytest.raises(DecodeError):
            pb.ForwardRequest.FromString(rest)
        return
    assert pb.ForwardRequest.FromString(rest) == _without_raw(expected)
    assert (bytes(raw) if raw is not None else b"") == expected.input.tensor.raw_data


@settings(max_examples=1000, deadline=None, database=None)
@given(data=_response_bytes())
@example(data=b"\x02\x0b\n\tfc.weight")  # a field numbered 0, which protobuf refuses (found by this test)
def test_fuzz_the_sdks_chunk_reader_reads_any_bytes_as_protobuf_does(data: bytes) -> None:
    """contract.wire.split_chunk_response on valid, damaged and cut tensor-stream responses: the
    chunks it returns (fields, and data as a view) are protobuf's, or it fails as protobuf does."""
    try:
        response = pb.GetGradientsResponse.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            wire.split_chunk_response(data)
        return
    expected = ([response.chunk] if response.HasField("chunk") else []) + list(response.chunks)
    got = wire.split_chunk_response(data)
    assert [(_chunk_without_data(c)[0], bytes(view)) for c, view in got] == [_chunk_without_data(c) for c in expected]


def test_responses_with_parts_written_in_place_join_to_the_same_bytes_without_a_copy() -> None:
    """``wire.Fill`` parts (a cast written straight into the response) join with the others into
    the bytes ``bytes.join`` would make; the response is filled in place through ``io.BytesIO``,
    whose ``getvalue`` hands over its buffer without a copy once no view of it is left (CPython's
    behaviour this relies on for speed, checked here so that a change of it is noticed)."""
    payload = bytes(range(200)) * 50

    def fill(dest: memoryview) -> None:
        dest[:] = payload

    parts: list[wire.Part] = [b"head", memoryview(b"view"), wire.Fill(len(payload), fill), b"tail"]
    joined = wire.Pieces(parts, 12 + len(payload)).join().data
    assert joined == b"headview" + payload + b"tail"
    packer = wire.Packer(1 << 20)
    assert packer.add(wire.Pieces(parts, 12 + len(payload))) is None and packer.add(wire.Pieces([b"more"], 4)) is None
    flushed = packer.flush()
    assert flushed is not None and flushed.data == joined + b"more"
    out = io.BytesIO(bytes(16))
    with out.getbuffer() as view:
        view[:4] = b"abcd"
    assert out.getvalue() is out.getvalue()
