"""``python -m bench``: the side-by-side benchmark of the training service (issue 5).

Starts the server (and the raw gRPC floor) in a subprocess on loopback, runs every section against
local PyTorch or the floor in the same run, and prints one table. Each figure is a median over
repetitions after warm-up; the ratio column is the median of per-repetition ratios, which is robust
to the machine's load drifting during the run. See docs/benchmarks.md for the latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable

import torch

from bench.launch import Context, open_floors, start_server, start_standalone_floors
from bench.measure import cpu_model, load_average
from bench.rows import Row
from bench.link import parse_spec
from bench.sections import concurrency, grads, link, memory, ray, rpc, step, upload
from bench.steps import CASES

# Every section, in the order it runs: a module of bench/sections with run(ctx) -> rows.
RUNNERS: dict[str, Callable[[Context], list[Row]]] = {
    "step": step.run, "grads": grads.run, "upload": upload.run, "concurrency": concurrency.run,
    "memory": memory.run, "rpc": rpc.run, "ray": ray.run, "link": link.run}
# Run only when asked for (--sections ...,ray): ray starts a second server with a Ray of its own;
# link (root and `ip` only) a server in a network namespace of its own behind an emulated link.
OPTIONAL_SECTIONS = ("ray", "link")
SECTIONS = tuple(name for name in RUNNERS if name not in OPTIONAL_SECTIONS)  # the default set
COLUMNS = ("section", "case", "ours", "reference", "ratio", "target", "note")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW, got {text!r}")
    return dims


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS + OPTIONAL_SECTIONS)} (default: all but ray and link)")
    p.add_argument("--sizes", type=lambda s: [parse_shape(t) for t in s.split(",")],
                   default=[(1, 3, 64, 64), (8, 3, 224, 224), (32, 3, 224, 224)], help="step input shapes, NxCxHxW,...")
    p.add_argument("--ray-sizes", type=lambda s: [parse_shape(t) for t in s.split(",")],
                   default=[(1, 3, 64, 64), (32, 3, 224, 224)], help="step input shapes of the ray section")
    p.add_argument("--links", type=lambda s: [parse_spec(t) for t in s.split(",")],
                   default=[parse_spec("1gbit:2ms"), parse_spec("10gbit:0.2ms")], help="the link section's links, RATE:RTT,...")
    p.add_argument("--link-kind", choices=("auto", "netem", "tun"), default="auto",
                   help="how the link section makes its link (auto: netem where the kernel has it, else tun)")
    p.add_argument("--link-shape", type=parse_shape, default=(32, 3, 224, 224), help="the link section's TrainStep input shape")
    p.add_argument("--link-step-reps", type=int, default=5, help="repetitions of the link section's TrainStep")
    p.add_argument("--link-pings", type=int, default=100, help="round trips of the link section's ping-pong and empty call")
    p.add_argument("--link-bulk-bytes", type=int, default=50_000_000, help="bytes of the link section's bulk TCP calibration")
    p.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help=f"step cases, a subset of {','.join(CASES)}")
    p.add_argument("--reps", type=int, default=30, help="most measured repetitions of a step case")
    p.add_argument("--min-reps", type=int, default=5, help="fewest measured repetitions of a step case")
    p.add_argument("--seconds-per-case", type=float, default=20.0, help="time budget of a step case (sets the repetitions)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured repetitions first")
    p.add_argument("--transfer-reps", type=int, default=15, help="repetitions of the gradient and upload figures")
    p.add_argument("--upload-shape", type=parse_shape, default=(32, 3, 224, 224))
    p.add_argument("--upload-reps", type=int, default=8, help="repetitions of the upload figure (each runs the model)")
    p.add_argument("--clients", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--shared-clients", type=int, default=4)
    p.add_argument("--concurrency-shape", type=parse_shape, default=(1, 3, 64, 64))
    p.add_argument("--concurrency-seconds", type=float, default=10.0)
    p.add_argument("--cycles", type=int, default=1000, help="create/step/close cycles of the memory section (0: none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the server and the local reference run")
    p.add_argument("--chunk-bytes", type=int, default=0, help="the server's stream chunk size (0: its default, 4 MiB - 64 KiB)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads on both sides (0: torch's default, one per core)")
    p.add_argument("--reuse-buffers-bytes", type=int, default=0, help="the server's --reuse-buffers-bytes (0: its default, off)")
    p.add_argument("--pin-memory", action="store_true", help="the server with --pin-memory 1 (pinned host buffers; CUDA only)")
    p.add_argument("--json", default="", help="also write the rows to this file (numbers with units, and the text as printed)")
    p.add_argument("--quick", action="store_true", help="a tiny run that only proves every section works (CI smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.min_reps, args.warmup, args.transfer_reps = [(2, 3, 64, 64)], 2, 2, 1, 2
        args.ray_sizes = [(2, 3, 64, 64)]
        args.upload_reps = 2
        args.upload_shape, args.clients, args.shared_clients = (2, 3, 64, 64), [1, 2], 2
        args.concurrency_seconds, args.cycles, args.seconds_per_case = 0.5, 3, 1.0
        args.links, args.link_shape, args.link_step_reps, args.link_pings, args.link_bulk_bytes = (
            [parse_spec("1gbit:2ms")], (2, 3, 64, 64), 2, 10, 5_000_000)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS + OPTIONAL_SECTIONS) or set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown section or case: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The benchmark runs in a worker thread, as the server runs each call: glibc gives the main
    # thread an arena that it trims back to the OS after every step, so torch in the main thread
    # page-faults its activations in again each time (measured here: 2x slower under load, 3-6x
    # the page faults), which would compare allocators, not the service.
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(_run(args)), name="bench")
    worker.start()
    worker.join()
    return result[0] if result else 1


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    header = (f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} "
              f"({torch.get_num_threads()} threads); device {args.device}{' (server --pin-memory 1)' if args.pin_memory else ''}; "
              f"load average before: {load_average()}")
    print(header, flush=True)
    max_sessions = max(16, max(args.clients, default=1) + 2)
    with start_server(args.device, max_sessions, args.chunk_bytes, args.threads, reuse_buffers_bytes=args.reuse_buffers_bytes,
                      pin_memory=args.pin_memory) as server, start_standalone_floors() as standalone, \
            open_floors(server, standalone) as floors:
        ctx = Context(args, server, floors)
        for section, run in RUNNERS.items():
            if section in args.sections:
                started = time.perf_counter()
                rows += run(ctx)
                print(f"# {section} done in {time.perf_counter() - started:.0f} s (load {load_average()})",
                      file=sys.stderr, flush=True)
    print_table(rows)
    print(f"# load average after: {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [r.as_json() for r in rows], "children": ctx.children}, f, indent=1)
    return 0


def print_table(rows: list[Row]) -> None:
    """The rows as a Markdown table, as docs/benchmarks.md records them."""
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in rows:
        cells = row.cells()
        print("| " + " | ".join(cells[c] for c in COLUMNS) + " |")
