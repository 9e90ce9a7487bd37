"""Server settings: one frozen dataclass, filled from command-line flags and their environment twins.

Each flag ``--some-flag`` has the environment variable ``TRAINER_SOME_FLAG``; a flag given on the
command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from remote_trainer.contract.names import AUTOCAST_MODES, MEMORY_FORMATS
from remote_trainer.engine.limits import Limits
from remote_trainer.server.tokens import load_tokens

MIB = 1024 * 1024
# The Ray namespace of a server that starts a Ray of its own (no ray_address): no one else is there.
LOCAL_RAY_NAMESPACE = "remote-trainer"


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with."""

    host: str = "127.0.0.1"
    port: int = 50051
    # "auto" (ImageNet weights when they are in the torch hub cache, else random), "random",
    # "imagenet", or a path to a state_dict file (.pt/.pth via torch.load(weights_only=True), or .safetensors).
    weights: str = "auto"
    # "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # Seed of random weights (and of the default session's heads).
    seed: int = 0
    # Classes of the default session's head; 0 means the weights' own (1000 for ImageNet).
    num_classes: int = 0
    # Directory of weight files that clients may name in CreateSession; empty: none allowed.
    data_dir: str = ""
    # Most sessions open at once, the default session included.
    max_sessions: int = 16
    # Largest message accepted or sent, in bytes (gRPC's default of 4 MiB is too small for a batch).
    max_message_bytes: int = 256 * MIB
    # Most elements in one input tensor (32 x 3 x 224 x 224 fits four times over).
    max_input_elements: int = Limits.max_input_elements
    # Largest batch (N) of a Forward.
    max_batch: int = Limits.max_batch
    # Data bytes per chunk in GetGradients/GetParameters streams: just under gRPC's default 4 MiB
    # receive limit, so a client with default options (grpcurl) reads every response, and few
    # responses, each of which costs both sides a write, a read and a wake-up (docs/benchmarks.md).
    chunk_bytes: int = 4 * MIB - 64 * 1024
    # Worker threads running the calls' torch work; each session uses at most one at a time, and calls
    # waiting (for their request, their session or a slow reader) hold none.
    max_workers: int = 16
    # Seconds a server stream waits for its client to take the next message before ending the stream.
    stream_write_timeout_seconds: float = 60.0
    # Seconds a call's request may take to arrive whole, from the call's start (then the call is
    # refused DEADLINE_EXCEEDED REQUEST_NOT_RECEIVED): a client that stops sending holds nothing longer.
    # A 256 MiB request needs a link of at least 36 Mbit/s for the default.
    request_receive_seconds: float = 60.0
    # Bytes of requests being received at once, all calls together, counted as max_message_bytes each
    # (the server cannot know a request's length before it reads it): max_receiving_bytes /
    # max_message_bytes requests are received at once (at least 2), half of them one caller's; the
    # other calls wait for a turn before their request is read (server/receive.py).
    max_receiving_bytes: int = 1024 * MIB
    # Bytes of tensor-stream responses made but not yet sent, all streams together: a stream that
    # would pass it is refused (RESOURCE_EXHAUSTED), so clients opening streams they do not read
    # cannot make the server hold more. About 20 streams of all of resnet18's gradients.
    max_stream_bytes: int = 1024 * MIB
    # Watchers (WatchSession) open at once, all sessions together, and on one session; past either the
    # watch is refused (RESOURCE_EXHAUSTED). A watcher holds no thread, only its buffer.
    max_watchers: int = 64
    max_watchers_per_session: int = 8
    # Events kept on the server for one watcher that has not read them yet: past it the oldest are
    # dropped and the watcher is told how many it missed, so a slow watcher never slows training.
    watch_buffer_events: int = 256
    # Seconds a numbered call that arrived before the numbers below it waits for them (then it is
    # refused OPERATION_OUT_OF_ORDER): how far a pipelining client's calls may be reordered in transit.
    operation_order_wait_seconds: float = 10.0
    # Shared memory for clients on this host (docs/shared-memory.md): off unless 1; each session's
    # region holds at most max_shared_memory_bytes, counted in the session's and the server's memory
    # budgets until the session ends (replaced regions too). Not on the default session. Local backend only.
    allow_shared_memory: int = 0
    max_shared_memory_bytes: int = 256 * MIB
    # Seconds that in-flight calls get to finish on SIGTERM.
    grace_seconds: float = 10.0
    # Python logging level name.
    log_level: str = "INFO"
    # Bearer tokens accepted, comma-separated, each "token" or "name:token"; empty (and no
    # tokens_file): no authentication. Every RPC but health then needs "authorization: Bearer TOKEN".
    tokens: str = ""
    # A file of tokens, one "token" or "name:token" a line (# comments allowed).
    tokens_file: str = ""
    # Most sessions one token may hold (0: only max_sessions applies).
    max_sessions_per_token: int = 0
    # TLS: the server's certificate chain and private key (PEM); empty: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    # TLS: CA certificate (PEM) that client certificates must be signed by (mutual TLS); empty: none asked.
    tls_client_ca: str = ""
    # Directory of checkpoints (SaveCheckpoint/LoadCheckpoint); empty: checkpoints disabled.
    checkpoint_dir: str = ""
    # Each session checkpoints itself every N steps to auto-SESSION.ckpt (0: never).
    checkpoint_every: int = 0
    # Sessions unused this many seconds are closed (0: never); the default session never expires.
    # A session with a call running or waiting is not idle.
    session_idle_seconds: float = 3600.0
    # A pending forward's graph (activations kept for Backward) is dropped when its session has had
    # no call for this many seconds (0: kept until the next call); the default session's too.
    pending_graph_seconds: float = 600.0
    # Automatic checkpoints (checkpoint_every) kept per folder: the newest N auto-*.ckpt files (0: all).
    keep_auto_checkpoints: int = 3
    # Bytes of checkpoint files one owner (a token's name; everyone alike without tokens) may hold
    # in the checkpoint directory, automatic ones included; a save past it is refused (0: no quota).
    # No default bound: the right one depends on the disk and the number of owners.
    max_checkpoint_bytes: int = 0
    # Memory all sessions together may hold on the server's device, in bytes, estimated from shapes
    # before each big allocation (0: 80% of the machine's memory on CPU, 90% of the GPU's on CUDA).
    memory_budget_bytes: int = 0
    # Memory one session may hold (model, gradients, optimizer state, pending graph, a call's work).
    session_memory_bytes: int = 4 * 1024 * MIB
    # Port of the Prometheus metrics HTTP endpoint (-1: off; 0: a free port, logged).
    metrics_port: int = -1
    # Where sessions live: "local" (in this process) or "ray" (each a Ray actor in a Ray cluster,
    # found by id from any front-end joined to the same cluster and namespace).
    backend: str = "local"
    # The Ray cluster to join: "auto" (the one this host belongs to), "HOST:PORT" of its head's GCS,
    # "ray://HOST:10001" (Ray Client), or empty: start a one-node Ray inside this process.
    ray_address: str = ""
    # Ray namespace of the session actors and their registry: front-ends that share it share sessions.
    # Required with ray_address (a cluster may hold several deployments; one shared default would let
    # one deployment's front-end take over another's sessions); a Ray of the server's own uses
    # LOCAL_RAY_NAMESPACE.
    ray_namespace: str = ""
    # Resources each session's actor reserves, where Ray places it: CPUs, GPUs (a fraction shares a
    # GPU between sessions), and custom resources as "NAME=AMOUNT,...".
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0
    ray_resources: str = ""
    # How Ray places new sessions: "spread" (over the nodes, round robin) or "default" (Ray's own:
    # fill a node first).
    ray_scheduling: str = "spread"
    # Seconds a call on a session actor (or its creation) may take before it is reported UNAVAILABLE.
    ray_timeout: float = 600.0
    # Directory of TensorBoard event files, a run per session (loss, grad norm, lr, step time,
    # gradient histograms); empty: off. Needs the tensorboard package.
    tensorboard_dir: str = ""
    # Gradient histograms every N steps (0: none); each copies every gradient to the CPU.
    tensorboard_histograms_every: int = 10
    # glibc keeps freed buffers up to this size for reuse (mallopt M_MMAP_THRESHOLD, and a trim
    # threshold 8 times it) instead of mapping every large message fresh and page-faulting it in:
    # tensor streams run faster. Off by default: large buffers then come from the heap rather
    # than page-aligned maps, and some CPU kernels round differently with other alignments, so
    # results drift from a local PyTorch process in the last bits (docs/benchmarks.md). Closing a
    # session still gives memory back (malloc_trim). 0: glibc's defaults.
    reuse_buffers_bytes: int = 0

    # GPU fast paths: forwards under torch.autocast ("off", "bf16", "fp16"; the logits differ from
    # float32 within the tolerance in docs/benchmarks.md) and weights and inputs in "channels_last"
    # memory format (or "contiguous"): every session's unless it chooses its own in CreateSession;
    # cuDNN autotuning (1: on; CUDA only), for the whole process.
    autocast: str = "off"
    memory_format: str = "contiguous"
    cudnn_benchmark: int = 0
    # 1: tensors go to the device from page-locked (pinned) host memory with non-blocking copies,
    # and come back (GetGradients, GetParameters) through pinned buffers; needs a CUDA device.
    pin_memory: int = 0

    def run_options(self) -> dict[str, Any]:
        """How every session's model runs: the fields of the engine's ModelSpec they set."""
        return {
            "autocast": self.autocast,
            "channels_last": self.memory_format == "channels_last",
            "cudnn_benchmark": bool(self.cudnn_benchmark),
            "pin_memory": bool(self.pin_memory),
        }

_HELP = {
    "autocast": "off | bf16 | fp16: run forwards under torch.autocast (mixed precision); a session may choose its own",
    "memory_format": "contiguous | channels_last: memory format of the weights and inputs; a session may choose its own",
    "cudnn_benchmark": "1: let cuDNN autotune its convolution algorithms (CUDA only; 0: off)",
    "pin_memory": "1: copy tensors to and from the GPU through pinned host memory, non-blocking (CUDA only; 0: off)",
    "host": "address to listen on (0.0.0.0 or [::] for all interfaces)",
    "port": "port to listen on; 0 picks a free one (the log says which)",
    "weights": "auto | random | imagenet | PATH to a state_dict (.pt/.pth) or .safetensors file",
    "device": "auto | cpu | cuda | cuda:N",
    "seed": "seed of random weights",
    "num_classes": "classes of the default session's head (0: the weights' own)",
    "data_dir": "directory of weight files that clients may name in CreateSession",
    "max_sessions": "most sessions open at once, the default one included",
    "max_message_bytes": "largest gRPC message accepted or sent, in bytes",
    "max_input_elements": "most elements in one input tensor",
    "max_batch": "largest batch of a Forward",
    "chunk_bytes": "data bytes per chunk in tensor streams",
    "max_workers": "worker threads running torch work (at most one per session at a time)",
    "stream_write_timeout_seconds": "seconds a stream waits for a client to read its next message",
    "request_receive_seconds": "seconds a call's request may take to arrive whole (then DEADLINE_EXCEEDED)",
    "max_receiving_bytes": "bytes of requests received at once, each counted as max-message-bytes (at least 2 at once)",
    "max_stream_bytes": "most bytes of tensor-stream responses made and not yet sent, all streams together",
    "max_watchers": "most WatchSession streams open at once, all sessions together",
    "max_watchers_per_session": "most WatchSession streams open at once on one session",
    "watch_buffer_events": "events kept for a watcher that has not read them (then the oldest are dropped, and it is told)",
    "operation_order_wait_seconds": "seconds a numbered call waits for the lower numbers that have not arrived",
    "allow_shared_memory": "1: clients on this host may ask for a shared-memory region per session (OpenSharedMemory; local backend only)",
    "max_shared_memory_bytes": "largest shared-memory region of one session, in bytes (counted in the memory budget)",
    "grace_seconds": "seconds in-flight calls get to finish on SIGTERM",
    "log_level": "DEBUG | INFO | WARNING | ERROR",
    "tokens": "accepted bearer tokens, comma-separated, each TOKEN or NAME:TOKEN (empty: no authentication)",
    "tokens_file": "file of accepted tokens, one TOKEN or NAME:TOKEN a line",
    "max_sessions_per_token": "most sessions one token may hold (0: no per-token limit)",
    "tls_cert": "PEM certificate chain of the server (enables TLS)",
    "tls_key": "PEM private key of the server",
    "tls_client_ca": "PEM CA that client certificates must be signed by (enables mutual TLS)",
    "checkpoint_dir": "directory of session checkpoints (empty: checkpoints off)",
    "checkpoint_every": "each session checkpoints itself every N steps (0: never)",
    "session_idle_seconds": "close sessions idle this long (0: never)",
    "pending_graph_seconds": "drop a pending forward's graph after this long without calls (0: never)",
    "keep_auto_checkpoints": "newest automatic checkpoints kept per folder (0: all)",
    "max_checkpoint_bytes": "bytes of checkpoints one token (or, without tokens, the whole folder) may hold (0: no quota)",
    "memory_budget_bytes": "memory all sessions may hold on the device, estimated before allocating (0: 80%% of RAM, 90%% of a GPU's; "
                           "with --backend ray the whole cluster's, 0: Ray's memory resource)",
    "session_memory_bytes": "memory one session may hold, estimated before allocating",
    "metrics_port": "Prometheus metrics HTTP port (-1: off, 0: a free port)",
    "backend": "local | ray: sessions in this process, or each a Ray actor in a Ray cluster",
    "ray_address": "Ray cluster to join (ray backend): auto | HOST:PORT | ray://HOST:PORT; empty: start a local one",
    "ray_namespace": "Ray namespace of this deployment's sessions (required with ray-address); front-ends sharing it share sessions",
    "ray_num_cpus": "CPUs each session's actor reserves",
    "ray_num_gpus": "GPUs each session's actor reserves (a fraction shares one GPU)",
    "ray_resources": "custom Ray resources each session reserves, NAME=AMOUNT,...",
    "ray_scheduling": "spread | default: how Ray places sessions over the nodes",
    "ray_timeout": "seconds a call on a session actor may take before it is UNAVAILABLE",
    "tensorboard_dir": "write TensorBoard event files here, a run per session (empty: off; needs tensorboard)",
    "tensorboard_histograms_every": "gradient histograms in the TensorBoard files every N steps (0: none)",
    "reuse_buffers_bytes": "glibc keeps freed buffers up to this size for reuse, not page-faulted in again (0, the default: glibc's own)",
}


class _Parser(argparse.ArgumentParser):
    """argparse, except that a refusal is one line, the reason and where to read more, not the
    usage text (some 60 flags) with the reason under it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every flag)\n")


def env_name(field_name: str) -> str:
    """The environment twin of a setting: ``max_batch`` -> ``TRAINER_MAX_BATCH``."""
    return "TRAINER_" + field_name.upper()


def parse_settings(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from flags, then environment variables, then defaults."""
    env = os.environ if environ is None else environ
    parser = _Parser(
        prog="trainer-server",
        description="gRPC training service holding a torchvision resnet18. "
        "Every flag can also be set by the environment variable named in brackets.",
    )
    defaults = Settings()
    for f in fields(Settings):
        kind = type(getattr(defaults, f.name))
        default = getattr(defaults, f.name)
        if env_name(f.name) in env:
            try:
                default = kind(env[env_name(f.name)])
            except ValueError:
                parser.error(f"{env_name(f.name)}={env[env_name(f.name)]!r} is not a valid {kind.__name__}")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{_HELP[f.name]} [{env_name(f.name)}] (default: {getattr(defaults, f.name)!r})",
        )
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    problems = validate(settings)
    if problems:
        parser.error("; ".join(problems))
    return settings


def validate(settings: Settings) -> list[str]:
    """What is wrong with the settings, if anything."""
    problems = []
    if not 0 <= settings.port <= 65535:
        problems.append(f"port {settings.port} is not in 0..65535")
    for name in ("session_memory_bytes", "max_sessions", "max_message_bytes", "max_input_elements", "max_batch", "chunk_bytes", "max_workers",
                 "max_watchers", "max_watchers_per_session", "watch_buffer_events"):
        if getattr(settings, name) < 1:
            problems.append(f"{name.replace('_', '-')} must be at least 1")
    if settings.autocast not in AUTOCAST_MODES:
        problems.append(f"autocast {settings.autocast!r} is not off, bf16 or fp16")
    if settings.memory_format not in MEMORY_FORMATS:
        problems.append(f"memory-format {settings.memory_format!r} is not contiguous or channels_last")
    if settings.cudnn_benchmark not in (0, 1):
        problems.append("cudnn-benchmark must be 0 or 1")
    if settings.pin_memory not in (0, 1):
        problems.append("pin-memory must be 0 or 1")
    if settings.allow_shared_memory not in (0, 1):
        problems.append("allow-shared-memory must be 0 or 1")
    if settings.allow_shared_memory and settings.backend != "local":
        problems.append("allow-shared-memory needs --backend local (a session in a Ray actor is in another process, "
                        "maybe on another host)")
    if settings.max_shared_memory_bytes < 1:
        problems.append("max-shared-memory-bytes must be at least 1")
    # Whether "auto" finds a GPU is known once torch is imported: the session's engine refuses
    # pin-memory on a CPU device then (PIN_MEMORY_NEEDS_CUDA), which stops the server at startup.
    if settings.pin_memory and (settings.device == "cpu" or settings.backend == "ray" and settings.device == "auto"
                                and settings.ray_num_gpus == 0):
        problems.append("pin-memory needs a CUDA device (pinned host buffers only speed up copies to an accelerator); "
                        "the sessions' device is the CPU" + (" (ray-num-gpus is 0)" if settings.device == "auto" else ""))
    if settings.request_receive_seconds <= 0:
        problems.append("request-receive-seconds must be positive")
    if settings.max_receiving_bytes < 1:
        problems.append("max-receiving-bytes must be at least 1")
    if settings.stream_write_timeout_seconds <= 0:
        problems.append("stream-write-timeout-seconds must be positive")
    if settings.operation_order_wait_seconds < 0:
        problems.append("operation-order-wait-seconds must not be negative")
    if settings.max_stream_bytes < settings.chunk_bytes:
        problems.append("max-stream-bytes must be at least chunk-bytes")
    if settings.num_classes < 0:
        problems.append("num-classes must not be negative")
    for name in ("data_dir", "checkpoint_dir"):
        value = getattr(settings, name)
        if value and not Path(value).is_dir():
            problems.append(f"{name.replace('_', '-')} {value!r} is not a directory (make it first: mkdir -p {shlex.quote(value)})")
    for name in ("tokens_file", "tls_cert", "tls_key", "tls_client_ca"):
        value = getattr(settings, name)
        if value and not Path(value).is_file():
            problems.append(f"{name.replace('_', '-')} {value!r} is not a file")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        problems.append("tls-cert and tls-key go together")
    if settings.tls_client_ca and not settings.tls_cert:
        problems.append("tls-client-ca needs tls-cert and tls-key")
    for name in ("checkpoint_every", "max_sessions_per_token", "session_idle_seconds", "pending_graph_seconds",
                 "keep_auto_checkpoints", "memory_budget_bytes", "max_checkpoint_bytes"):
        if getattr(settings, name) < 0:
            problems.append(f"{name.replace('_', '-')} must not be negative")
    if settings.checkpoint_every and not settings.checkpoint_dir:
        problems.append("checkpoint-every needs checkpoint-dir")
    if settings.max_checkpoint_bytes and not settings.checkpoint_dir:
        problems.append("max-checkpoint-bytes needs checkpoint-dir")
    if settings.tensorboard_histograms_every < 0:
        problems.append("tensorboard-histograms-every must not be negative")
    if not 0 <= settings.reuse_buffers_bytes <= 32 * MIB:
        problems.append("reuse-buffers-bytes must be in 0..33554432 (glibc's largest mmap threshold)")
    if not -1 <= settings.metrics_port <= 65535:
        problems.append(f"metrics-port {settings.metrics_port} is not in -1..65535")
    if settings.backend not in ("local", "ray"):
        problems.append(f"backend {settings.backend!r} is not local or ray")
    if settings.ray_num_cpus < 0 or settings.ray_num_gpus < 0 or settings.ray_timeout <= 0:
        problems.append("ray-num-cpus and ray-num-gpus must not be negative, ray-timeout must be positive")
    if settings.ray_num_gpus > 1 and settings.ray_num_gpus != int(settings.ray_num_gpus):
        problems.append("ray-num-gpus above 1 must be a whole number (Ray's rule)")
    if settings.backend == "ray" and settings.ray_address and not settings.ray_namespace:
        problems.append("ray-namespace is required with ray-address: name this deployment (its front-ends share the "
                        "namespace, another deployment on the cluster uses another), e.g. --ray-namespace trainer-prod")
    if settings.ray_scheduling not in ("spread", "default"):
        problems.append(f"ray-scheduling {settings.ray_scheduling!r} is not spread or default")
    try:
        ray_resources(settings)
    except ValueError as exc:
        problems.append(str(exc))
    if not problems and (settings.tokens or settings.tokens_file):
        try:
            load_tokens(settings.tokens, settings.tokens_file)
        except (ValueError, OSError) as exc:
            problems.append(str(exc))
    return problems


def ray_resources(settings: Settings) -> dict[str, float]:
    """The custom resources of ``--ray-resources`` ("NAME=AMOUNT,..."), checked."""
    resources: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in settings.ray_resources.split(","))):
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or not value > 0:
            raise ValueError(f"ray-resources entry {item!r} is not NAME=AMOUNT with AMOUNT > 0")
        resources[name.strip()] = value
    return resources
