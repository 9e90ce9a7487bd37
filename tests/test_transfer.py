"""Tensor streams on the fast path (wire-form chunks, the SDK's own reader): values equal local
PyTorch in every transfer type, with or without statistics."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from remote_trainer.client import InvalidArgumentError, Session, core
from remote_trainer.contract import chunking, wire
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.contract.trainer.v1 import trainer_pb2_grpc as pb_grpc
from remote_trainer.engine.errors import Abandoned
from remote_trainer.engine.results import NamedTensor
from remote_trainer.server import convert
from remote_trainer.server.settings import Settings
from tests.conftest import assert_equal_to_local, rand


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gradients_and_parameters_equal_local_with_and_without_statistics(session: Session, local: nn.Module, dtype: str) -> None:
    data, labels = rand(2, 3, 64, 64, seed=5), rand(2, 1000, seed=6)
    session.forward(data)
    session.backward("sum", labels)
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    torch_dtype = getattr(torch, dtype)
    with_stats = session.gradients(dtype=dtype)
    without = session.gradients(dtype=dtype, stats=False)
    values = session.parameters(dtype=dtype, include_buffers=True, stats=False)
    expected_values = dict(local.named_parameters()) | dict(local.named_buffers())
    for name, p in local.named_parameters():
        assert p.grad is not None
        expected = p.grad.to(torch_dtype).float() if p.grad.is_floating_point() else p.grad
        for got in (with_stats[name], without[name]):
            assert got.present
            assert_equal_to_local(np.asarray(got.array, np.float32), expected)
        assert with_stats[name].stats is not None and without[name].stats is None
        assert with_stats[name].stats.norm == pytest.approx(float(p.grad.norm()), rel=1e-3 if dtype == "float32" else 1e-2)
    for name, value in expected_values.items():
        want = (value.to(torch_dtype).float() if value.is_floating_point() else value).detach()
        assert_equal_to_local(np.asarray(values[name].array, want.numpy().dtype), want)


def test_statistics_skipped_with_stats_only_is_refused(session: Session) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        session.gradients(stats_only=True, stats=False)
    assert err.value.reason == "NOTHING_TO_SEND"


def test_an_absent_gradient_stays_absent_without_statistics(session: Session) -> None:
    session.freeze("layer1")
    session.forward(rand(2, 3, 64, 64))
    session.backward("sum", rand(2, 1000))
    grads = session.gradients(stats=False)
    assert not grads["layer1.0.conv1.weight"].present and grads["layer1.0.conv1.weight"].array is None
    assert grads["fc.weight"].present and grads["fc.weight"].array is not None


def test_packed_streams_carry_the_same_chunks_in_fewer_responses(session: Session) -> None:
    """pack_chunks (what the SDK asks for): the same chunks, in the same order, as the stream of one
    chunk per response, small tensors sharing responses of at most the chunk size (the server's
    default here); with statistics only, the whole stream is one response."""
    session.freeze("layer1")  # some gradients absent, so the stream has absent chunks too
    session.forward(rand(2, 3, 64, 64))
    session.backward("sum", rand(2, 1000))
    stub = session._client.stub
    chunk_bytes = Settings.chunk_bytes
    for rpc, request in ((stub.GetGradients, pb.GetGradientsRequest), (stub.GetParameters, pb.GetParametersRequest)):
        for stats_only in (False, True):
            plain = list(rpc(request(session_id=session.session_id, stats_only=stats_only), timeout=60))
            packed = list(rpc(request(session_id=session.session_id, stats_only=stats_only, pack_chunks=True), timeout=60))
            assert all(r.HasField("chunk") and not r.chunks for r in plain)
            assert all(not r.HasField("chunk") and r.chunks for r in packed)
            assert [c for r in packed for c in r.chunks] == [r.chunk for r in plain]
            assert all(r.ByteSize() <= chunk_bytes or len(r.chunks) == 1 for r in packed)
            assert len(packed) == 1 if stats_only else len(packed) < len(plain) * 0.6


def test_a_client_with_grpc_default_limits_reads_every_tensor_stream(target: str, session: Session) -> None:
    """The server's chunks are as large as fit gRPC's default 4 MiB receive limit, so a client that
    sets no message limit (grpcurl, a plain generated stub) reads the largest tensors' streams,
    packed or not, and gets the same bytes as the SDK."""
    session.forward(rand(2, 3, 64, 64))
    session.backward("sum", rand(2, 1000))
    expected = session.parameters("layer4.1.conv2", stats=False)["layer4.1.conv2.weight"].array
    with grpc.insecure_channel(target) as channel:  # gRPC's defaults: 4 MiB the largest message received
        stub = pb_grpc.TrainerServiceStub(channel)
        for rpc, request in ((stub.GetGradients, pb.GetGradientsRequest), (stub.GetParameters, pb.GetParametersRequest)):
            for packed in (False, True):
                responses = list(rpc(request(session_id=session.session_id, pack_chunks=packed), timeout=60))
                assert max(r.ByteSize() for r in responses) > 3 * 1024 * 1024  # the limit is approached, not avoided
        got = core.named_tensors(((c, c.data) for r in stub.GetParameters(pb.GetParametersRequest(
            session_id=session.session_id, patterns=["layer4.1.conv2"], pack_chunks=True), timeout=60) for c in r.chunks), True)
    assert expected is not None and np.array_equal(got["layer4.1.conv2.weight"].array, expected)


def test_a_stream_sends_its_first_tensors_while_later_ones_are_encoded(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server writes each tensor's responses as soon as they are made: here the encoding of a
    late tensor waits until the client holds the first response, which only a stream that sends
    while it encodes can deliver (one that sent after encoding everything would wait out the 20 s)."""
    first_arrived = threading.Event()
    waited: list[bool] = []
    original = convert.wire_chunks

    def wire_chunks(item: NamedTensor, chunk_bytes: int, packed: bool = False, dtype: torch.dtype | None = None) -> list[wire.Pieces]:
        if item.name == "layer4.1.bn2.bias":
            waited.append(first_arrived.wait(timeout=20))
        return original(item, chunk_bytes, packed, dtype)

    monkeypatch.setattr(convert, "wire_chunks", wire_chunks)
    session.forward(rand(2, 3, 64, 64))
    session.backward("sum", rand(2, 1000))
    stream = session._client.stub.GetGradients(pb.GetGradientsRequest(session_id=session.session_id), timeout=120)
    first = next(stream)
    first_arrived.set()
    rest = list(stream)
    assert waited == [True]
    assert first.chunk.name == "conv1.weight" and rest[-1].chunk.name == "fc.bias"


def test_a_stream_whose_client_left_stops_encoding_at_the_next_tensor() -> None:
    """The sender of GetGradients/GetParameters asks before each tensor whether the stream's client
    still waits: once it left, nothing more is encoded (the call ends Abandoned)."""
    sent: list[wire.Serialized] = []
    wanted = [True]
    send = convert.ChunkSender(sent.append, 1 << 20, False, lambda: wanted[0])
    tensor = NamedTensor("fc.bias", (3,), torch.ones(3), None)
    send(tensor)
    wanted[0] = False
    with pytest.raises(Abandoned):
        send(tensor)
    assert len(sent) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [4096, 4097])
def test_a_cast_written_into_the_responses_equals_torch_cast(dtype: torch.dtype, chunk_bytes: int) -> None:
    """A float32 tensor sent as float16 or bfloat16 is cast straight into the responses
    (``convert.CastInto``, chunks ending on elements), or, for a chunk size that would cut an
    element, cast first: either way the bytes of ``Tensor.to``, packed or not."""
    t = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 1000
    item = NamedTensor("w", (5000,), t, None)
    want = t.to(dtype).float().numpy()
    for packed in (False, True):
        sent: list[wire.Serialized] = []
        send = convert.ChunkSender(sent.append, chunk_bytes, packed, lambda: True, dtype)
        send(item)
        send.finish()
        [got] = chunking.assemble_split_chunks(c for s in sent for c in wire.split_chunk_response(s.data))
        assert got.data_type == convert.TORCH_TO_WIRE[dtype] and got.array is not None
        np.testing.assert_array_equal(np.asarray(got.array, np.float32), want)
