#!/usr/bin/env python3
"""Build the image with pip reading a local wheel directory instead of PyPI.

For hosts whose builds cannot reach a package index (this project's CI). The
Dockerfile is not changed: this serves the wheel directory over HTTP on the
host's loopback and passes the PIP_NO_INDEX and PIP_FIND_LINKS build args,
with the build's RUN steps on the host network so that they reach it. Fill
the directory first with deploy/fill-wheels.sh, and build the base image
first where it cannot be pulled (deploy/build-base-image.sh).

The address is fixed (127.0.0.1:38080 unless --serve says otherwise) because
build args are part of Docker's layer cache key: a new port each build would
reinstall every dependency each time.

Usage: deploy/offline-build.py [--wheels DIR] [--serve HOST:PORT] [-t TAG] [-- DOCKER-BUILD-ARGS...]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", default=os.environ.get("TRAINER_WHEEL_DIR", "/var/cache/trainer-wheels"))
    parser.add_argument("--serve", default=os.environ.get("TRAINER_WHEEL_SERVE", "127.0.0.1:38080"))
    parser.add_argument("-t", "--tag", default="resnet-trainer:latest")
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"))
    parser.add_argument("build_args", nargs="*", help="more arguments for docker build (after --)")
    args = parser.parse_args(argv)

    wheels = Path(args.wheels)
    if not any(wheels.glob("*.whl")):
        parser.error(f"no wheels in {wheels}: run deploy/fill-wheels.sh {wheels}")
    host, _, port = args.serve.rpartition(":")
    handler = functools.partial(_QuietHandler, directory=str(wheels))
    try:
        server = http.server.ThreadingHTTPServer((host, int(port)), handler)
    except OSError as error:
        parser.error(f"cannot serve the wheels on {args.serve} ({error}); pick another with --serve")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    command = [
        args.docker, "build",
        "--network", "host",
        "--build-arg", "PIP_NO_INDEX=1",
        "--build-arg", f"PIP_FIND_LINKS=http://{args.serve}/",
        "--tag", args.tag,
        *args.build_args,
        str(ROOT),
    ]  # fmt: skip
    print("+", " ".join(command), flush=True)
    try:
        return subprocess.call(command)
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
