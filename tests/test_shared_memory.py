"""The co-located fast path (docs/shared-memory.md): a session's shared-memory region, through real
server processes. The same numbers as the gRPC path (bit for bit) and local PyTorch; refused unless
the server allows it and within its bound; only the session's owner gets the region, with a ticket
good once; nothing left after close, expiry or SIGKILL."""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from remote_trainer.client import Session, TrainerClient
from remote_trainer.client.aio import AsyncTrainerClient
from remote_trainer.client import shared_memory as shm
from remote_trainer.client.errors import (
    FailedPreconditionError, NotFoundError, ResourceExhaustedError, UnavailableError, from_rpc_error,
)
from remote_trainer.client.types import NamedTensor
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.engine.budget import model_bytes
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from remote_trainer.server.shared_memory import TICKET_SECONDS, Region, SharedMemory
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local, rand
from tests.test_server_process import ROOT, ServerLog, start, stop

MIB = 1024 * 1024
LIMIT = 160 * MIB  # the test server's --max-shared-memory-bytes: room for the SDK's default region (144 MiB)
TOKENS = "alice:token-alice,bob:token-bob"
MEMFD = "memfd:trainer-shared-memory"


@pytest.fixture(scope="module")
def shared(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int, ServerLog]]:
    """A server that allows shared memory, at most LIMIT a session, with two tokens."""
    proc, port, log = start("--weights", str(data_dir / WEIGHTS_NAME), "--data-dir", str(data_dir), "--tokens", TOKENS,
                            "--allow-shared-memory", "1", "--max-shared-memory-bytes", str(LIMIT))
    yield proc, port, log
    stop(proc)


def client_of(port: int, token: str) -> TrainerClient:
    return TrainerClient(f"localhost:{port}", token=token, timeout=120)


def in_region(answer: dict[str, NamedTensor]) -> bool:
    """Whether every array of the answer is a view of a shared-memory mapping (the answer came through
    the region, not in gRPC messages)."""
    return all(isinstance(t.array, np.ndarray) and isinstance(t.array.base, np.ndarray)
               and isinstance(getattr(t.array.base.base, "obj", None), mmap.mmap) for t in answer.values() if t.present)


def memfds(pid: int) -> tuple[int, int]:
    """How many descriptors and mappings of region memory files process ``pid`` holds."""
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/{MEMFD}")
        except OSError:
            pass  # closed meanwhile
    with open(f"/proc/{pid}/maps") as maps:
        mapped = sum(MEMFD in line for line in maps)
    return fds, mapped


def region_inodes(pid: int) -> set[int]:
    """The inodes of the region memory files process ``pid`` holds, by descriptor or mapping."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/{MEMFD}"):
                inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            pass  # closed meanwhile
    with open(f"/proc/{pid}/maps") as maps:
        inodes |= {int(line.split()[4]) for line in maps if MEMFD in line}
    return inodes


def redeem(address: str, ticket: bytes) -> tuple[bytes, list[int]]:
    """What the server's ticket socket answers to ``ticket``: its message and the descriptors it sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect("\0" + address)
        connection.sendall(ticket)
        connection.shutdown(socket.SHUT_WR)
        answer, fds, _, _ = socket.recv_fds(connection, 16, 4)
    return answer, fds


def test_values_equal_the_grpc_path_and_local_pytorch(
    shared: tuple[subprocess.Popen[str], int, ServerLog], local: torch.nn.Module
) -> None:
    _, port, _ = shared
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME, shared_memory=True) as fast:
        plain = client.session(fast.session_id)  # the same session, through gRPC messages
        x = rand(4, 3, 64, 64, seed=3)
        through_shm = fast.forward(x, eval_mode=True, no_grad=True).logits
        through_grpc = plain.forward(x, eval_mode=True, no_grad=True).logits
        assert through_shm is not None and np.array_equal(through_shm, through_grpc)
        local.eval()
        with torch.no_grad():
            assert_equal_to_local(through_shm, local(torch.from_numpy(x)))

        labels = np.array([1, 5, 7, 9])
        fast.forward(x)
        fast.backward("cross_entropy", labels)
        local.train()
        torch.nn.functional.cross_entropy(local(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        expected = dict(local.named_parameters())
        for dtype in ("float32", "float16", "bfloat16"):
            grads, sent = fast.gradients(dtype=dtype), plain.gradients(dtype=dtype)
            assert in_region(grads) == (dtype != "bfloat16") and not in_region(sent)  # bfloat16 is widened: a copy
            assert list(grads) == list(sent) == list(expected)
            for name, g in grads.items():
                assert g.array is not None and g.array.dtype == sent[name].array.dtype  # type: ignore[union-attr]
                assert np.array_equal(g.array, sent[name].array) and g.stats == sent[name].stats, name
        for name, g in fast.gradients().items():
            assert_equal_to_local(g.array, expected[name].grad)  # type: ignore[arg-type]
        del grads
        values, sent = fast.parameters(include_buffers=True), plain.parameters(include_buffers=True)
        assert in_region(values) and list(values) == list(sent) and len(values) > len(expected)
        for name, v in values.items():
            assert np.array_equal(v.array, sent[name].array) and v.stats == sent[name].stats, name  # type: ignore[arg-type]
        state = local.state_dict()
        for name, v in values.items():
            assert_equal_to_local(v.array, state[name].float())
        assert fast.gradients(stats_only=True) == plain.gradients(stats_only=True)  # statistics only: no region needed

        # A whole step with its input in the region, against a local step.
        optimizer = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.9)
        optimizer.zero_grad()
        fast.train_step(x, "cross_entropy", labels)
        torch.nn.functional.cross_entropy(local(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        optimizer.step()
        for name, v in fast.parameters().items():
            assert_equal_to_local(v.array, dict(local.named_parameters())[name])


def test_a_training_forward_keeps_its_input_when_the_region_is_written_again(
    shared: tuple[subprocess.Popen[str], int, ServerLog], local: torch.nn.Module
) -> None:
    """A no_grad Forward and a TrainStep read their input from the region itself, but a Forward
    that keeps its graph keeps a copy: conv1's weight gradient needs the input at Backward, and the
    input area may be written in between (here by the test, with other bytes)."""
    _, port, _ = shared
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME, shared_memory=True) as fast:
        x, labels = rand(4, 3, 64, 64, seed=11), np.array([3, 1, 4, 1])
        fast.forward(x)
        assert fast._shared is not None
        fast._shared.map[:x.nbytes] = b"\x7f" * x.nbytes  # the input's bytes, written over
        fast.backward("cross_entropy", labels)
        local.train()
        torch.nn.functional.cross_entropy(local(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        grads = fast.gradients("conv1.weight")
        assert_equal_to_local(grads["conv1.weight"].array, local.conv1.weight.grad)  # type: ignore[arg-type]


def test_a_replaced_region_is_refused(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    """One region a session: a handle still mapping one replaced since is refused, never answered
    from its stale mapping."""
    _, port, _ = shared
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME, shared_memory=MIB) as first:
        x = rand(2, 3, 32, 32)
        first.forward(x)
        first.backward("sum", np.ones((2, 1000), np.float32))
        second = client.session(first.session_id)
        second.use_shared_memory()
        for stale in (lambda: first.gradients("fc.*"), lambda: first.forward(x, eval_mode=True, no_grad=True)):
            with pytest.raises(FailedPreconditionError) as refused:
                stale()
            assert refused.value.reason == "SHARED_MEMORY_UNAVAILABLE" and "replaced" in str(refused.value)
        views = second.gradients()
        copies = client.session(first.session_id).gradients()
        assert in_region(views)
        for name, v in views.items():
            assert np.array_equal(v.array, copies[name].array), name  # type: ignore[arg-type]


def test_an_answer_held_is_never_written_over(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    """Answers are views of an answer area of the region, which the server writes only when a
    request names it, and the SDK names only areas no live array lies in: an answer held stays as it
    came (and writable) through any number of later calls; with every answer area held, the next
    answers come in gRPC messages; once dropped, an area is used again."""
    _, port, _ = shared
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME, shared_memory=True) as s:
        def step(seed: int) -> None:
            s.forward(rand(2, 3, 32, 32, seed=seed))
            s.backward("sum", np.ones((2, 1000), np.float32))

        step(0)
        held = s.gradients()
        assert in_region(held)
        expected = {name: t.array.copy() for name, t in held.items()}  # type: ignore[union-attr]
        later = []
        for seed in range(1, 4):
            step(seed)
            later.append(s.gradients())
            assert not np.array_equal(later[-1]["fc.weight"].array, expected["fc.weight"])  # the gradients did change
        assert in_region(later[0]) and not in_region(later[1]) and not in_region(later[2])  # two answer areas
        for name, t in held.items():
            assert np.array_equal(t.array, expected[name]), name  # type: ignore[arg-type]
        weight = held["fc.weight"].array
        assert weight is not None and weight.flags.writeable
        weight[0, 0] = 1234.5  # the user's own to change
        assert held["fc.weight"].array[0, 0] == 1234.5  # type: ignore[index]
        del later, t, weight
        assert in_region(s.gradients())  # the area of the answers dropped is used again
        for name, t in held.items():
            if name != "fc.weight":
                assert np.array_equal(t.array, expected[name]), name  # type: ignore[arg-type]


def test_a_bad_answer_area_is_refused_and_nothing_written(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    """An answer area not inside the region, or not at a multiple of 64: INVALID_ARGUMENT
    BAD_SHARED_TENSOR, and not a byte of the region written."""
    _, port, _ = shared
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME, shared_memory=4 * MIB) as s:
        s.forward(rand(2, 3, 32, 32))
        s.backward("sum", np.ones((2, 1000), np.float32))
        region = s._shared
        assert region is not None
        region.map[:] = b"\xa5" * region.size
        for offset, size in ((-64, MIB), (32, MIB), (4 * MIB, 0), (3 * MIB, 2 * MIB), (0, -1)):
            for request in (pb.GetGradientsRequest(session_id=s.session_id, patterns=["fc.*"], shared_memory_region=region.id,
                                                   shared_memory_area_offset=offset, shared_memory_area_bytes=size),
                            pb.GetParametersRequest(session_id=s.session_id, patterns=["fc.*"], shared_memory_region=region.id,
                                                    shared_memory_area_offset=offset, shared_memory_area_bytes=size)):
                call = client.stub.GetGradients if isinstance(request, pb.GetGradientsRequest) else client.stub.GetParameters
                with pytest.raises(grpc.RpcError) as refused:
                    list(call(request))  # type: ignore[operator]
                error = from_rpc_error(refused.value)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "BAD_SHARED_TENSOR", (offset, size)
                assert "inside" in str(error)
        assert region.map[:] == b"\xa5" * region.size
        # A good area is written, and only there.
        answer = list(client.stub.GetGradients(pb.GetGradientsRequest(
            session_id=s.session_id, patterns=["fc.bias"], shared_memory_region=region.id,
            shared_memory_area_offset=MIB, shared_memory_area_bytes=64 * 1024)))
        chunk = answer[0].chunks[0]
        assert chunk.shared_memory_offset == MIB and chunk.total_bytes == 4000
        assert region.map[:MIB] == b"\xa5" * MIB and region.map[MIB + 4000:] == b"\xa5" * (region.size - MIB - 4000)


def test_the_asyncio_face_goes_through_the_region_too(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    _, port, _ = shared

    async def run() -> tuple[np.ndarray | None, dict[str, np.ndarray | None], dict[str, np.ndarray | None]]:
        async with AsyncTrainerClient(f"localhost:{port}", token="token-alice", timeout=120) as client:
            session = await client.create_session(WEIGHTS_NAME, shared_memory=True)
            try:
                assert session._shared is not None
                x = rand(2, 3, 32, 32)
                logits = (await session.forward(x, eval_mode=True, no_grad=True)).logits
                await session.forward(x)
                await session.backward("sum", np.ones((2, 1000), np.float32))
                fast = {k: t.array for k, t in (await session.gradients()).items()}
                plain = {k: t.array for k, t in (await client.session(session.session_id).gradients()).items()}
                return logits, fast, plain
            finally:
                await session.close()
                assert session._shared is None

    logits, fast, plain = asyncio.run(run())
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME) as sync:
        assert np.array_equal(logits, sync.forward(rand(2, 3, 32, 32), eval_mode=True, no_grad=True).logits)  # type: ignore[arg-type]
    assert list(fast) == list(plain) and all(np.array_equal(fast[k], plain[k]) for k in fast)  # type: ignore[arg-type]


def test_refused_when_the_server_does_not_allow_it(client: TrainerClient) -> None:
    """The in-process test server runs with the default, --allow-shared-memory 0."""
    before = len(client.list_sessions())
    with pytest.raises(FailedPreconditionError) as refused:
        client.create_session(WEIGHTS_NAME, shared_memory=True)
    assert refused.value.reason == "SHARED_MEMORY_UNAVAILABLE" and "--allow-shared-memory" in str(refused.value)
    assert len(client.list_sessions()) == before  # the session made for it was closed again
    request = pb.ForwardRequest(input=pb.TensorInput(shared_memory=pb.SharedTensor(shape=[1, 3, 8, 8],
                                                                                   data_type=pb.DATA_TYPE_FLOAT32)))
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Forward(request)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--allow-shared-memory" in str(error.value.details())


def test_bounded_in_size(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    _, port, _ = shared
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME) as session:
        with pytest.raises(ResourceExhaustedError) as refused:
            session.use_shared_memory(LIMIT + 1)
        assert refused.value.reason == "SHARED_MEMORY_TOO_LARGE" and refused.value.metadata["limit"] == str(LIMIT)
        session.use_shared_memory(3 * MIB)  # areas of 1 MiB: room for a small batch, not for 46.8 MB of gradients
        session.forward(rand(2, 3, 32, 32))
        session.backward("sum", np.zeros((2, 1000), np.float32))
        with pytest.raises(ResourceExhaustedError) as small:
            session.gradients()
        assert small.value.reason == "SHARED_MEMORY_TOO_SMALL" and int(small.value.metadata["needed_bytes"]) > 46 * 10**6
        assert session.gradients("layer1.0.*")["layer1.0.conv1.weight"].array is not None  # what fits comes through
        plain = client.session(session.session_id)
        for x in (rand(8, 3, 64, 64), rand(4, 3, 160, 160)):  # 393 KB through the input area; 1.2 MB in the message
            fast = session.forward(x, eval_mode=True, no_grad=True).logits
            assert np.array_equal(fast, plain.forward(x, eval_mode=True, no_grad=True).logits)  # type: ignore[arg-type]
        request = pb.ForwardRequest(session_id=session.session_id, no_grad=True, input=pb.TensorInput(
            shared_memory=pb.SharedTensor(offset=3 * MIB - 100, shape=[1, 3, 8, 8], data_type=pb.DATA_TYPE_FLOAT32,
                                          region=session._shared.id)))  # type: ignore[union-attr]
        with pytest.raises(grpc.RpcError) as outside:
            client.stub.Forward(request)
        assert outside.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inside" in str(outside.value.details())
        session.use_shared_memory(60 * MIB)  # 20 MiB areas: the first tensors are written before the rest is found not to fit
        with pytest.raises(ResourceExhaustedError) as small:
            session.gradients()
        assert small.value.reason == "SHARED_MEMORY_TOO_SMALL" and int(small.value.metadata["needed_bytes"]) > 46 * 10**6
        assert np.array_equal(session.gradients("fc.*")["fc.bias"].array,  # type: ignore[arg-type]
                              client.session(session.session_id).gradients("fc.*")["fc.bias"].array)  # type: ignore[arg-type]


def test_only_the_session_owner_gets_the_region_once(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    _, port, _ = shared
    with client_of(port, "token-alice") as alice, client_of(port, "token-bob") as bob, \
            alice.create_session(WEIGHTS_NAME) as session:
        with pytest.raises(grpc.RpcError) as stranger:  # another token: the session does not exist for it
            bob.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=session.session_id, size_bytes=MIB))
        assert stranger.value.code() == grpc.StatusCode.NOT_FOUND
        grant = alice.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=session.session_id, size_bytes=MIB))
        assert len(grant.ticket) == 64 and grant.size_bytes == MIB
        assert redeem(grant.socket_address, b"0" * 64) == (b"NO", [])  # a guessed ticket
        assert redeem(grant.socket_address, b"") == (b"NO", [])  # a connection with none
        answer, fds = redeem(grant.socket_address, grant.ticket.encode())
        assert answer == b"OK" and len(fds) == 1
        try:
            assert os.fstat(fds[0]).st_size == MIB and os.readlink(f"/proc/self/fd/{fds[0]}").startswith(f"/{MEMFD}")
        finally:
            os.close(fds[0])
        assert redeem(grant.socket_address, grant.ticket.encode()) == (b"NO", [])  # replayed: used once already
        # Bob's own grant for his own session opens that session's region only, never Alice's.
        with bob.create_session(WEIGHTS_NAME) as his:
            theirs = bob.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=his.session_id, size_bytes=2 * MIB))
            answer, fds = redeem(theirs.socket_address, theirs.ticket.encode())
            assert answer == b"OK" and os.fstat(fds[0]).st_size == 2 * MIB
            os.close(fds[0])
        # A ticket of a region replaced since is void.
        old = alice.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=session.session_id, size_bytes=MIB))
        alice.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=session.session_id, size_bytes=MIB))
        assert redeem(old.socket_address, old.ticket.encode()) == (b"NO", [])


def test_an_expired_ticket_gets_nothing() -> None:
    """Tickets are good for TICKET_SECONDS (the store's clock moved, not slept through)."""
    now = [0.0]
    memory = SharedMemory(MIB, clock=lambda: now[0])
    try:
        ticket, _ = memory.open("s", MIB)
        now[0] += TICKET_SECONDS + 0.1
        assert redeem(memory.address, ticket.encode()) == (b"NO", [])
        ticket, _ = memory.open("s", MIB)
        now[0] += TICKET_SECONDS - 0.1
        answer, fds = redeem(memory.address, ticket.encode())
        assert answer == b"OK" and len(fds) == 1
        os.close(fds[0])
    finally:
        memory.close_all()


def test_connections_that_stall_on_the_ticket_socket_do_not_lock_others_out() -> None:
    """Anyone on the host may connect to the ticket socket: 16 connections (all its slots) that
    trickle a byte at a time, never a whole ticket, are closed REDEEM_SECONDS after each connected,
    and one user holds at most a few slots at once, so a client with a good ticket still gets its
    region (retrying while the socket is busy). Once, a trickle reset the timeout at each byte and
    held every slot for as long as it went on."""
    memory = SharedMemory(MIB)
    stop_trickling = threading.Event()
    closed_by_server = []

    def trickle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect("\0" + memory.address)
            try:
                while not stop_trickling.wait(0.25):  # a byte every quarter second: never a whole ticket
                    connection.sendall(b"0")
            except OSError:
                closed_by_server.append(True)

    tricklers = [threading.Thread(target=trickle) for _ in range(16)]
    try:
        for thread in tricklers:
            thread.start()
        ticket, region = memory.open("s", MIB)
        mapped = shm.SharedRegion.fetch(shm.Grant(ticket, memory.address, MIB, region.id))
        assert mapped.size == MIB
        mapped.close()
    finally:
        stop_trickling.set()
        for thread in tricklers:
            thread.join()
        memory.close_all()
    assert closed_by_server, "no stalled connection was ever closed by the server"


def test_a_region_counts_in_the_memory_budget(data_dir: Path) -> None:
    """A region is refused when the session's memory budget cannot hold it too."""
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir), allow_shared_memory=1,
                                     session_memory_bytes=model_bytes(1000) + 4 * MIB))
    try:
        with TrainerClient(f"localhost:{running.port}", timeout=120) as client, client.create_session(WEIGHTS_NAME) as session:
            with pytest.raises(ResourceExhaustedError) as refused:
                session.use_shared_memory(8 * MIB)
            assert refused.value.reason == "SESSION_MEMORY_BUDGET"
            session.use_shared_memory(2 * MIB)
    finally:
        running.stop(None).wait()


@pytest.fixture(scope="module")
def budgeted(data_dir: Path) -> Iterator[TrainerServer]:
    """An in-process server whose budgets bind: a session holds at most its model and 8 MiB more,
    the server at most three models (the default session and two more) and 8 MiB more."""
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir),
                                     allow_shared_memory=1, session_memory_bytes=model_bytes(1000) + 8 * MIB,
                                     memory_budget_bytes=3 * model_bytes(1000) + 8 * MIB))
    yield running
    running.stop(None).wait()


def test_a_region_counts_in_the_sessions_own_budget(budgeted: TrainerServer) -> None:
    """The region is part of what the session holds: a forward that fits beside the model alone but
    not beside model and region is refused SESSION_MEMORY_BUDGET (once, the region was counted
    beside the session's budget, not in it)."""
    with TrainerClient(f"localhost:{budgeted.port}", timeout=120) as client, \
            client.create_session(WEIGHTS_NAME, shared_memory=7 * MIB) as session:
        with pytest.raises(ResourceExhaustedError) as refused:
            session.forward(rand(4, 3, 32, 32))  # about 1.9 MiB of graph: model + 7 MiB + that > model + 8 MiB
        assert refused.value.reason == "SESSION_MEMORY_BUDGET"
        session.forward(rand(2, 3, 32, 32))  # about 0.96 MiB: fits beside the region


def test_a_replaced_region_stays_counted_until_the_session_ends(budgeted: TrainerServer) -> None:
    """The server cannot see whether the client still maps a region it replaced (the pages live as
    long as someone does), so a replaced region stays counted, in the session's budget and the
    server's, until the session ends: replacing again and again is refused once the budget is full,
    the session's current region untouched; closing the session gives it all back. Once, a replaced
    region left the count when the server let go of it, and a client could so pin any amount."""
    with TrainerClient(f"localhost:{budgeted.port}", timeout=120) as client:
        first = client.create_session(WEIGHTS_NAME, shared_memory=3 * MIB)
        other = client.create_session(WEIGHTS_NAME)
        try:
            first.use_shared_memory(3 * MIB)  # 6 MiB counted for the session: the old region may still be mapped
            region = first._shared
            with pytest.raises(ResourceExhaustedError) as again:
                first.use_shared_memory(3 * MIB)  # 9 MiB: over the session's 8
            assert again.value.reason == "SESSION_MEMORY_BUDGET"
            assert first._shared is region  # the refused call changed nothing: the current region still serves
            x = rand(2, 3, 32, 32)
            assert np.array_equal(first.forward(x, eval_mode=True, no_grad=True).logits,  # type: ignore[arg-type]
                                  client.session(first.session_id).forward(x, eval_mode=True, no_grad=True).logits)
            with pytest.raises(ResourceExhaustedError) as server:
                other.use_shared_memory(3 * MIB)  # the server's budget: 6 MiB of the first session + 3 > 8
            assert server.value.reason == "SERVER_MEMORY_BUDGET"
            first.close()
            other.use_shared_memory(8 * MIB)  # the first session's regions, replaced one included, counted no more
        finally:
            first.close()
            other.close()


def test_two_regions_opened_at_once_are_checked_together(budgeted: TrainerServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sessions open regions at the same moment that together are over the server's budget
    (5 + 5 MiB of 8): at most one gets its region, the other is refused SERVER_MEMORY_BUDGET. Each
    call waits, where it makes its region, for the other to get there too (or to be refused): once
    the budget was checked, then the region made, then counted, and both calls passed the check
    before either was counted."""
    making = threading.Barrier(2)
    real_open = SharedMemory.open

    def open_together(self: SharedMemory, session_id: str, size: int) -> tuple[str, Region]:
        try:
            making.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass  # the other call was refused before it got here
        return real_open(self, session_id, size)

    monkeypatch.setattr(SharedMemory, "open", open_together)
    with TrainerClient(f"localhost:{budgeted.port}", timeout=120) as client:
        sessions = [client.create_session(WEIGHTS_NAME) for _ in range(2)]
        outcomes: list[str] = []

        def open_region(session: Session) -> None:
            try:
                session.use_shared_memory(5 * MIB)
                outcomes.append("opened")
            except ResourceExhaustedError as exc:
                outcomes.append(exc.reason)
                making.abort()  # the other call need not wait for this one

        threads = [threading.Thread(target=open_region, args=(s,)) for s in sessions]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for session in sessions:
                session.close()
    assert sorted(outcomes) == ["SERVER_MEMORY_BUDGET", "opened"]


def test_the_default_session_gets_no_region(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    """Every caller may use the default session, so a region there would be any caller's to replace:
    refused with its own reason, by the server and so by both faces of the SDK (never a silent
    fall-back to gRPC messages)."""
    _, port, _ = shared
    with client_of(port, "token-alice") as client:
        for session_id in ("", "default"):
            with pytest.raises(grpc.RpcError) as refused:
                client.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=session_id, size_bytes=MIB))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert from_rpc_error(refused.value).reason == "SHARED_MEMORY_DEFAULT_SESSION"
        with pytest.raises(FailedPreconditionError) as sdk:
            client.session().use_shared_memory(MIB)
        assert sdk.value.reason == "SHARED_MEMORY_DEFAULT_SESSION" and "session of your own" in str(sdk.value)

    async def run() -> str:
        async with AsyncTrainerClient(f"localhost:{port}", token="token-alice", timeout=120) as aio:
            try:
                await aio.session().use_shared_memory(MIB)
            except FailedPreconditionError as exc:
                return exc.reason
        return "opened"

    assert asyncio.run(run()) == "SHARED_MEMORY_DEFAULT_SESSION"


def test_the_region_is_sealed_at_its_size(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    """A client can neither grow the region past the server's bound nor shrink it under the server's mapping."""
    _, port, _ = shared
    with client_of(port, "token-alice") as client, client.create_session(WEIGHTS_NAME) as session:
        grant = client.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=session.session_id, size_bytes=MIB))
        _, fds = redeem(grant.socket_address, grant.ticket.encode())
        try:
            for size in (2 * MIB, 0):
                with pytest.raises(PermissionError):
                    os.ftruncate(fds[0], size)
        finally:
            os.close(fds[0])


def test_close_unmaps_the_region_on_the_server(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    proc, port, _ = shared
    before, here = memfds(proc.pid), memfds(os.getpid())
    with client_of(port, "token-alice") as client:
        session = client.create_session(WEIGHTS_NAME, shared_memory=4 * MIB)
        session.forward(rand(1, 3, 32, 32), eval_mode=True, no_grad=True)
        held = memfds(proc.pid)
        assert held[0] > before[0] and held[1] == before[1] + 1
        assert memfds(os.getpid())[1] == here[1] + 1  # mapped here too
        session.close()
        assert memfds(proc.pid) == before
        assert memfds(os.getpid()) == here  # and unmapped here


@pytest.mark.parametrize("grace", ["30", "0"])
def test_a_call_through_the_region_in_flight_when_the_server_stops(data_dir: Path, local: torch.nn.Module, grace: str) -> None:
    """SIGTERM while a TrainStep reads its input from the region (the server's log says it runs):
    with 30 s of grace it finishes, with local PyTorch's loss (the server closes its regions only
    once the calls in flight have ended); with none it ends UNAVAILABLE, as every call a stopping
    server cuts off (gRPC's own "Cancelling all calls"), never INTERNAL. The server exits 0 both times."""
    x, labels = rand(16, 3, 224, 224, seed=7), np.arange(16) % 10
    running = threading.Event()

    def on_line(line: str) -> None:
        if "rpc=TrainStep" in line and " running" in line:
            running.set()

    proc, port, log = start("--weights", str(data_dir / WEIGHTS_NAME), "--data-dir", str(data_dir), "--allow-shared-memory", "1",
                            "--grace-seconds", grace, "--log-level", "DEBUG", on_line=on_line)
    try:
        # No retries: the first answer is the one asserted (the SDK would retry UNAVAILABLE).
        with TrainerClient(f"localhost:{port}", timeout=120, retry=None) as client, ThreadPoolExecutor(1) as pool:
            session = client.create_session(WEIGHTS_NAME, shared_memory=True)  # not closed: the server is gone by then
            step = pool.submit(session.train_step, x, "cross_entropy", labels)
            assert running.wait(120)
            proc.send_signal(signal.SIGTERM)
            if grace == "30":
                local.train()
                expected = torch.nn.functional.cross_entropy(local(torch.from_numpy(x)), torch.from_numpy(labels))
                assert step.result(120).loss == pytest.approx(expected.item(), rel=1e-5)
            else:
                with pytest.raises(UnavailableError) as cut:
                    step.result(120)
                assert cut.value.code == grpc.StatusCode.UNAVAILABLE, cut.value
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    whole = log.whole()
    # The TrainStep was in flight when the signal came: it ran before it (and with grace, ended OK after it).
    lines = [line for line in whole if "received SIGTERM" in line or "rpc=TrainStep" in line]
    assert "running" in lines[0] and "received SIGTERM" in lines[1], lines
    assert grace == "0" or "status=OK" in lines[2], lines
    assert not [line for line in whole if "INTERNAL" in line or "Traceback" in line], whole


def test_expiry_and_sigkill_leave_nothing(data_dir: Path) -> None:
    closed = threading.Event()
    shm_before = sorted(os.listdir("/dev/shm"))
    proc, port, _ = start("--weights", str(data_dir / WEIGHTS_NAME), "--data-dir", str(data_dir), "--allow-shared-memory",
                          "1", "--session-idle-seconds", "1",
                          on_line=lambda line: closed.set() if "shared-memory region closed" in line else None)
    try:
        before = memfds(proc.pid)
        with TrainerClient(f"localhost:{port}", timeout=120) as client:
            session = client.create_session(WEIGHTS_NAME, shared_memory=MIB)
            assert memfds(proc.pid)[1] == before[1] + 1
            assert closed.wait(60), "the session did not expire"
            assert memfds(proc.pid) == before
            with pytest.raises(NotFoundError):
                session.info()
            session._drop_shared_memory()

            # Regions held by the server only (tickets never redeemed) and one mapped here too, then SIGKILL.
            kept = client.create_session(WEIGHTS_NAME)
            grant = client.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=kept.session_id, size_bytes=MIB))
            region = shm.SharedRegion.fetch(shm.Grant(grant.ticket, grant.socket_address, grant.size_bytes, grant.region))
            other = client.create_session(WEIGHTS_NAME)
            client.stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(session_id=other.session_id, size_bytes=MIB))
            assert memfds(proc.pid)[1] == before[1] + 2
            regions = region_inodes(proc.pid)
            assert len(regions) == 2, regions
            proc.kill()
            proc.wait()
            region.map[:4] = b"mine"  # the client's own mapping lives on until it unmaps it...
            region.close()
        holders = []  # ...and then no process holds any of the server's regions (other tests' may live on)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if region_inodes(int(pid)) & regions:
                    holders.append(pid)
            except OSError:
                pass  # gone, or not ours to read
        assert holders == []
        assert sorted(os.listdir("/dev/shm")) == shm_before  # nothing named, anywhere
        with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect("\0" + grant.socket_address)  # the ticket socket went with the process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_page_example_runs_verbatim(shared: tuple[subprocess.Popen[str], int, ServerLog]) -> None:
    """docs/shared-memory.md's SDK example, against the test server (its address and a token put in)."""
    _, port, _ = shared
    found = re.search(r"<!-- shared-memory: sdk -->\n```python\n(.*?)```", (ROOT / "docs" / "shared-memory.md").read_text(), re.S)
    assert found, "docs/shared-memory.md has no block marked shared-memory: sdk"
    code = found.group(1).replace('TrainerClient("localhost:50051")', f'TrainerClient("localhost:{port}", token="token-alice")')
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "62 (1000, 512)"
