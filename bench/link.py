"""An emulated network link between two network namespaces, for the bench's ``link`` section.

``open_link(spec)`` makes two namespaces, A (the server's) and B (the client's), joined by a link of
``spec.rate_bps`` bits a second and ``spec.rtt_s`` round-trip time, and removes everything it made on
exit (namespaces, devices, the forwarder process), on an exception or Ctrl-C too. It needs root and
``ip`` (iproute2). Two ways, the first the kernel allows:

- ``netem``: a veth pair, each end's egress shaped by ``tc qdisc ... netem delay RTT/2 rate RATE``.
- ``tun``: where the kernel has no sch_netem (CONFIG_NET_SCH_NETEM unset, as on the machine this
  was written on), one TUN device in each namespace and a forwarder process here
  (``python -m bench.link forward``) holding both: each packet read from one device is written to
  the other when a serial line of ``rate`` would have finished sending it (departure = max(arrival,
  previous departure) + bytes * 8 / rate) plus the one-way delay. The MTU is large (65000) so a
  link of 10 Gbit/s is ~20k packets a second, which one Python loop can move; whether it does is
  measured, not assumed (``calibrate`` in bench/link_client.py; the section prints it).

``python -m bench.link peer --host H`` is the calibration peer run in A: a TCP server answering a
one-byte ping-pong (the round trip) and sending N bytes on request (the bulk rate).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ADDRESS_A, ADDRESS_B = "10.201.0.1", "10.201.0.2"  # inside the namespaces only
MTU = 65000
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
QUEUE_LIMIT_BYTES = 32 * 1024 * 1024  # the forwarder's queue per direction (a router's buffer); beyond it packets drop


@dataclass(frozen=True)
class LinkSpec:
    """A link's claim: bits a second and round-trip time."""

    rate_bps: float
    rtt_s: float

    @property
    def name(self) -> str:
        return f"{_si(self.rate_bps)}bit/s, {self.rtt_s * 1e3:g} ms RTT"

    def limit(self, nbytes: int, round_trips: int = 1) -> float:
        """The least time this link takes to carry ``nbytes`` one way in ``round_trips`` round trips."""
        return nbytes * 8 / self.rate_bps + round_trips * self.rtt_s


def parse_spec(text: str) -> LinkSpec:
    """``1gbit:2ms`` (rate: bit, kbit, mbit, gbit; RTT: ms or us) as a LinkSpec."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)bit\s*:\s*([\d.]+)\s*(ms|us)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"a link is RATE:RTT, e.g. 1gbit:2ms or 10gbit:0.2ms; got {text!r}")
    rate = float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]
    rtt = float(m[3]) * (1e-3 if m[4] == "ms" else 1e-6)
    return LinkSpec(rate, rtt)


def _si(value: float) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:g} {prefix}"
    return f"{value:g} "


def unavailable() -> str:
    """Why a link cannot be made here ('' when it can): root and ``ip`` are needed."""
    if os.geteuid() != 0:
        return "the link section needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "the link section needs `ip` (iproute2)"
    return ""


@dataclass
class Link:
    """A link made by ``open_link``: its namespaces, addresses and how it is made (``kind``)."""

    spec: LinkSpec
    ns_a: str
    ns_b: str
    kind: str
    how: str  # in words, for the table
    forwarder: subprocess.Popen[str] | None = None

    def exec_in(self, ns: str) -> list[str]:
        """The command prefix that runs a command in namespace ``ns``."""
        return ["ip", "netns", "exec", ns]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@contextmanager
def open_link(spec: LinkSpec, kind: str = "auto") -> Iterator[Link]:
    """Two namespaces joined by ``spec``'s link: ``kind`` netem, tun, or auto (netem where the
    kernel has it, else tun). Removes everything it made on exit."""
    _remove_orphans()
    tag = f"rtlink{os.getpid()}"
    ns_a, ns_b = f"{tag}a", f"{tag}b"
    with ExitStack() as made:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            made.callback(_ip, "netns", "del", ns, check=False)
            _ip("-n", ns, "link", "set", "lo", "up")
        link = None
        if kind in ("auto", "netem"):
            link = _try_netem(spec, ns_a, ns_b, tag)
            if link is None and kind == "netem":
                raise RuntimeError("tc cannot add a netem qdisc here (this kernel has no sch_netem?)")
        if link is None:
            why = "tc could not add netem here" if kind == "auto" else "asked for"
            link = _tun_link(spec, ns_a, ns_b, tag, made, why)
        yield link


def _remove_orphans() -> None:
    """Namespaces an earlier run left behind (it was killed: SIGKILL runs no clean-up) are removed:
    ``rtlink<PID>a``/``b`` whose process is gone. Their devices and forwarder went with the run."""
    for line in _ip("netns", "list").stdout.splitlines():
        found = re.fullmatch(r"rtlink(\d+)[ab]", line.split(" ", 1)[0])
        if found and not Path(f"/proc/{found.group(1)}").exists():
            _ip("netns", "del", found.group(0), check=False)


def _try_netem(spec: LinkSpec, ns_a: str, ns_b: str, tag: str) -> Link | None:
    """A veth pair with netem on both ends, or None where the kernel has no netem (the pair removed)."""
    if shutil.which("tc") is None:
        return None
    _ip("link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
    _ip("link", "set", f"{tag}x", "netns", ns_a)
    _ip("link", "set", f"{tag}y", "netns", ns_b)
    for ns, dev, address in ((ns_a, f"{tag}x", ADDRESS_A), (ns_b, f"{tag}y", ADDRESS_B)):
        qdisc = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{spec.rtt_s / 2 * 1e6:.0f}us",
                                "rate", f"{spec.rate_bps:.0f}bit", "limit", "100000"], capture_output=True, text=True)
        if qdisc.returncode != 0:
            _ip("-n", ns_a, "link", "del", f"{tag}x", check=False)  # takes its peer with it
            return None
        _ip("-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
        _ip("-n", ns, "addr", "add", f"{address}/30", "dev", dev)
    return Link(spec, ns_a, ns_b, "netem", "netem on a veth pair")


def _tun_link(spec: LinkSpec, ns_a: str, ns_b: str, tag: str, made: ExitStack, why: str) -> Link:
    """A TUN device in each namespace and the forwarder between them (it made the devices: they
    go when it exits)."""
    dev_a, dev_b = f"{tag}x", f"{tag}y"
    forwarder = subprocess.Popen(
        [sys.executable, "-m", "bench.link", "forward", "--devices", dev_a, dev_b, "--rate", str(spec.rate_bps),
         "--one-way", str(spec.rtt_s / 2)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    made.callback(_stop_forwarder, forwarder)
    assert forwarder.stdout is not None
    if forwarder.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the link's forwarder did not start (exit code {forwarder.wait()})")
    for ns, dev, address, peer in ((ns_a, dev_a, ADDRESS_A, ADDRESS_B), (ns_b, dev_b, ADDRESS_B, ADDRESS_A)):
        _ip("link", "set", dev, "netns", ns)
        _ip("-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
        _ip("-n", ns, "addr", "add", address, "peer", peer, "dev", dev)
    return Link(spec, ns_a, ns_b, "tun", f"a user-space forwarder between two TUN devices, MTU {MTU} ({why})", forwarder)


def _stop_forwarder(process: subprocess.Popen[str]) -> None:
    """Closes the forwarder's stdin (it exits, and its devices go) and prints what it carried."""
    try:
        out, _ = process.communicate(timeout=10)  # closes its stdin first
        print(f"# link forwarder: {out.strip()}", file=sys.stderr, flush=True)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def forward(fd_a: int, fd_b: int, rate_bps: float, one_way_s: float, stop_fd: int) -> dict[str, float]:
    """Moves packets between two TUN devices until ``stop_fd`` reads end of file; each packet is
    written when the link would deliver it. Returns what it carried and how late it was."""
    for fd in (fd_a, fd_b):
        os.set_blocking(fd, False)
    # Per source device: the device it goes to, and its packets in flight with their delivery times.
    directions: dict[int, tuple[int, collections.deque[tuple[float, bytes]]]] = {
        fd_a: (fd_b, collections.deque()), fd_b: (fd_a, collections.deque())}
    sent_until = {fd_a: 0.0, fd_b: 0.0}  # when the line in each direction finishes its last packet
    queued = {fd_a: 0, fd_b: 0}
    stats = {"packets": 0.0, "bytes": 0.0, "dropped": 0.0, "late_total_s": 0.0, "late_max_s": 0.0}
    clock = time.monotonic
    while True:
        heads = [q[0][0] for _, q in directions.values() if q]
        timeout = max(0.0, min(heads) - clock()) if heads else None
        readable, _, _ = select.select([fd_a, fd_b, stop_fd], [], [], timeout)
        if stop_fd in readable and not os.read(stop_fd, 4096):
            return stats
        for src in readable:
            if src == stop_fd:
                continue
            queue = directions[src][1]
            for _ in range(64):
                try:
                    packet = os.read(src, 65536)
                except BlockingIOError:
                    break
                now = clock()
                if queued[src] + len(packet) > QUEUE_LIMIT_BYTES:
                    stats["dropped"] += 1
                    continue
                sent_until[src] = max(now, sent_until[src]) + len(packet) * 8 / rate_bps
                queue.append((sent_until[src] + one_way_s, packet))
                queued[src] += len(packet)
        now = clock()
        for src, (dst, queue) in directions.items():
            while queue and queue[0][0] <= now:
                due, packet = queue.popleft()
                queued[src] -= len(packet)
                try:
                    os.write(dst, packet)
                except OSError:  # the far device is not up (yet, or any more): the packet is lost
                    stats["dropped"] += 1
                    continue
                late = now - due
                stats["packets"] += 1
                stats["bytes"] += len(packet)
                stats["late_total_s"] += late
                stats["late_max_s"] = max(stats["late_max_s"], late)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _serve_peer(host: str) -> None:
    """The calibration peer: per connection, one request line ``ping`` (then echo one byte at a
    time until the client closes) or ``send N`` (then N bytes)."""
    server = socket.create_server((host, 0))
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            line = b""
            while not line.endswith(b"\n"):  # byte by byte: nothing after the line may be read here
                byte = conn.recv(1)
                if not byte:
                    return
                line += byte
            request = line.decode().split()
            if request[0] == "ping":
                while byte := conn.recv(1):
                    conn.sendall(byte)
            elif request[0] == "send":
                block = bytes(1 << 20)
                left = int(request[1])
                while left > 0:
                    conn.sendall(block[: min(left, len(block))])
                    left -= min(left, len(block))

    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _exit_when_stdin_closes() -> None:
    sys.stdin.read()
    os._exit(0)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.link")
    commands = parser.add_subparsers(dest="command", required=True)
    fwd = commands.add_parser("forward", help="make two TUN devices and carry packets between them (until stdin closes)")
    fwd.add_argument("--devices", nargs=2, required=True)
    fwd.add_argument("--rate", type=float, required=True, help="bits a second")
    fwd.add_argument("--one-way", type=float, required=True, help="one-way delay, seconds")
    peer = commands.add_parser("peer", help="the calibration peer (TCP ping-pong and bulk send; until stdin closes)")
    peer.add_argument("--host", required=True)
    args = parser.parse_args()
    if args.command == "peer":
        _serve_peer(args.host)
        return 0
    fd_a, fd_b = (_open_tun(name) for name in args.devices)
    try:  # a link is not slowed by the host's other work: run ahead of it where the kernel lets us
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        pass
    print("ready", flush=True)
    stats = forward(fd_a, fd_b, args.rate, args.one_way, sys.stdin.fileno())
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
