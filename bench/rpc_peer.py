"""The peer a user would pick instead of our service: torch.distributed.rpc on loopback.

``python -m bench.rpc_peer --store FILE [--threads N]`` is rank 1 ("trainer") of a two-process RPC
group whose rank 0 is the benchmark. It holds a resnet18 built as the benchmark's local model is,
and the functions below are what the benchmark calls on it with ``rpc.rpc_sync``. The benchmark
side is ``connect(threads)``: it starts this process, joins the group and yields a ``Peer``; on
leaving, both sides call ``rpc.shutdown()`` and the process exits (it is killed if it does not).

Transport: TensorPipe with only its ``uv`` transport (TCP sockets) and its ``basic`` channel (tensors
through that same TCP connection), with ``TP_SOCKET_IFNAME=lo`` so it listens and connects on
127.0.0.1. Left to itself TensorPipe would pick shared memory (``shm``) and cross-process memory
copies (``cma``) between two processes on one machine, which no network offers; the rendezvous is a
FileStore (``file://``), so nothing listens beyond TensorPipe's two loopback sockets.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch import nn

from bench.measure import stop_child
from remote_trainer.engine.models import build_model

PEER, BENCH = "trainer", "bench"
LR, MOMENTUM = 1e-2, 0.9
# Seconds the peer waits, after the benchmark closed its standard input, for the RPC shutdown to
# finish before it exits anyway (the benchmark died without shutting down).
ORPHAN_GRACE_S = 30.0


def backend_options(store_file: str, timeout: float = 300.0) -> rpc.TensorPipeRpcBackendOptions:
    """TCP on loopback only: TensorPipe's uv transport and basic channel (see the module's doc)."""
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"file://{store_file}", rpc_timeout=timeout, num_worker_threads=4,
        _transports=["uv"], _channels=["basic"],
    )


def loopback_env() -> dict[str, str]:
    """The environment both sides need before ``init_rpc``: TensorPipe's uv transport on ``lo``,
    and the Gloo group that ``init_rpc`` also creates on ``lo`` too."""
    return {"TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}


def quiet_warnings() -> None:
    """``init_rpc`` warns that it uses a Gloo backend as a process group (torch's own doing)."""
    warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)


# -- rank 1: the state and the functions the benchmark calls ---------------------------------------

_device = torch.device("cpu")
_model: nn.Module | None = None
_optimizer: torch.optim.Optimizer | None = None
_prediction: torch.Tensor | None = None


def _state() -> tuple[nn.Module, torch.optim.Optimizer]:
    if _model is None or _optimizer is None:
        raise RuntimeError("reset() first")
    return _model, _optimizer


def reset(device: str = "cpu") -> int:
    """A fresh model, as the benchmark's local one: ``build_model("random", 0, 0)`` on ``device``,
    SGD, train mode. Returns the torch threads the peer's calls run with."""
    global _device, _model, _optimizer, _prediction
    model, _ = build_model("random", 0, 0)
    _device = torch.device(device)
    _model = model.to(_device).train()
    _optimizer = torch.optim.SGD(_model.parameters(), lr=LR, momentum=MOMENTUM)
    _prediction = None
    return torch.get_num_threads()


def empty() -> None:
    """One round trip and nothing else."""


def train_step(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward, the tutorial's loss ``(prediction - labels).sum()``, backward, SGD step; no
    zero_grad (as the benchmark's local step). Returns the logits."""
    model, optimizer = _state()
    prediction: torch.Tensor = model(x.to(_device))
    (prediction - labels.to(_device)).sum().backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return prediction.detach().cpu()


def forward(x: torch.Tensor) -> torch.Tensor:
    """Forward, keeping the graph for ``backward``; returns the logits."""
    global _prediction
    model, _ = _state()
    _prediction = model(x.to(_device))
    return _prediction.detach().cpu()


def backward(labels: torch.Tensor) -> None:
    """The loss ``(prediction - labels).sum()`` of the last forward, backward through its graph."""
    global _prediction
    if _prediction is None:
        raise RuntimeError("forward() first")
    prediction, _prediction = _prediction, None
    (prediction - labels.to(_device)).sum().backward()  # type: ignore[no-untyped-call]


def step() -> None:
    """The optimizer's step."""
    _state()[1].step()


def take(x: torch.Tensor) -> int:
    """Receives a tensor and keeps nothing: an upload of its bytes to the peer (its element count back)."""
    return x.numel()


def gradients() -> list[torch.Tensor]:
    """Every parameter's ``.grad`` (float32), in model order (copied to the CPU first on a GPU)."""
    model, _ = _state()
    return [p.grad.cpu() for p in model.parameters() if p.grad is not None]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rpc_peer")
    parser.add_argument("--store", required=True, help="the rendezvous FileStore's path")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.update(loopback_env())
    quiet_warnings()
    done = threading.Event()

    def exit_if_orphaned() -> None:
        sys.stdin.read()  # until the benchmark closes our standard input (or exits)
        if not done.wait(ORPHAN_GRACE_S):
            os._exit(1)

    threading.Thread(target=exit_if_orphaned, daemon=True).start()
    print("ready", flush=True)  # imported and configured: the benchmark may join now
    rpc.init_rpc(PEER, rank=1, world_size=2, rpc_backend_options=backend_options(args.store))  # type: ignore[no-untyped-call]
    rpc.shutdown()  # serves the benchmark's calls until it shuts down too
    done.set()
    return 0


# -- rank 0: the benchmark's side ------------------------------------------------------------------


class Peer:
    """The benchmark's handle on the peer: each method is one ``rpc.rpc_sync`` call."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None  # the process's exit code, once ``connect`` has left

    def _call(self, fn: Any, *args: Any) -> Any:
        return rpc.rpc_sync(PEER, fn, args=args)

    def reset(self, device: str = "cpu") -> int:
        return int(self._call(reset, device))

    def empty(self) -> None:
        self._call(empty)

    def train_step(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self._call(train_step, x, labels)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self._call(forward, x)
        return result

    def backward(self, labels: torch.Tensor) -> None:
        self._call(backward, labels)

    def step(self) -> None:
        self._call(step)

    def gradients(self) -> list[torch.Tensor]:
        result: list[torch.Tensor] = self._call(gradients)
        return result

    def take(self, x: torch.Tensor) -> int:
        return int(self._call(take, x))


@contextmanager
def connect(threads: int = 0) -> Iterator[Peer]:
    """Starts ``python -m bench.rpc_peer`` and joins its RPC group as rank 0; on leaving, shuts the
    group down on both sides and waits for the process to exit (kills it if it does not)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        store = os.path.join(tmp, "store")
        cmd = [sys.executable, "-m", "bench.rpc_peer", "--store", store]
        env = {**os.environ, **loopback_env()}
        if threads:
            cmd += ["--threads", str(threads)]
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        process = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        saved = {k: os.environ.get(k) for k in loopback_env()}
        joined = False
        peer = Peer(process.pid)
        try:
            # A peer that fails before joining would leave init_rpc waiting for the store's timeout.
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the rpc peer did not start (exit code {process.wait()})")
            os.environ.update(loopback_env())  # read by TensorPipe and Gloo when the agent starts
            quiet_warnings()
            try:
                rpc.init_rpc(BENCH, rank=0, world_size=2, rpc_backend_options=backend_options(store))  # type: ignore[no-untyped-call]
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            joined = True
            yield peer
        finally:
            try:
                if joined:
                    rpc.shutdown()
            finally:
                stop_child(process, timeout=60)
                peer.returncode = process.returncode


if __name__ == "__main__":
    sys.exit(main())
