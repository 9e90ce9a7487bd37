#!/usr/bin/env python3
"""Container health check: ask the server's gRPC health service (grpc.health.v1).

Exits 0 when the trainer service reports SERVING and 1 otherwise (not yet started, shutting down,
or unreachable), as Docker's HEALTHCHECK expects. It reads the server's own environment:

- It calls 127.0.0.1 on TRAINER_PORT (the server listens on 0.0.0.0 in the image);
  TRAINER_HEALTHCHECK_TARGET (host:port) overrides that.
- Health needs no token, so TRAINER_TOKENS does not matter here.
- With TLS (TRAINER_TLS_CERT set) it verifies the server against TRAINER_HEALTHCHECK_CA_CERT, else
  TRAINER_TLS_CLIENT_CA, else TRAINER_TLS_CERT itself (right for a self-signed certificate), and
  expects the name TRAINER_HEALTHCHECK_SERVER_NAME (default "localhost") in the certificate.
- With mutual TLS (TRAINER_TLS_CLIENT_CA set) it presents TRAINER_HEALTHCHECK_CLIENT_CERT and
  TRAINER_HEALTHCHECK_CLIENT_KEY, else the server's own certificate and key (accepted when the
  client CA also signed the server's certificate).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "trainer.v1.TrainerService"


def _read(*names: str) -> bytes | None:
    """The contents of the file named by the first of these variables that is set."""
    for name in names:
        if os.environ.get(name):
            return Path(os.environ[name]).read_bytes()
    return None


def channel(target: str) -> grpc.Channel:
    """A channel to the server, with TLS when the server has it."""
    if not os.environ.get("TRAINER_TLS_CERT"):
        return grpc.insecure_channel(target)
    roots = _read("TRAINER_HEALTHCHECK_CA_CERT", "TRAINER_TLS_CLIENT_CA", "TRAINER_TLS_CERT")
    cert = key = None
    if os.environ.get("TRAINER_TLS_CLIENT_CA"):
        cert = _read("TRAINER_HEALTHCHECK_CLIENT_CERT", "TRAINER_TLS_CERT")
        key = _read("TRAINER_HEALTHCHECK_CLIENT_KEY", "TRAINER_TLS_KEY")
    credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)
    name = os.environ.get("TRAINER_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])


def main() -> int:
    target = os.environ.get("TRAINER_HEALTHCHECK_TARGET") or "127.0.0.1:" + os.environ.get("TRAINER_PORT", "50051")
    timeout = float(os.environ.get("TRAINER_HEALTHCHECK_TIMEOUT", "3"))
    try:
        with channel(target) as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
    except grpc.RpcError as error:
        print(f"{target}: {error.code().name}: {error.details()}")
        return 1
    except OSError as error:  # a certificate file named above is missing
        print(f"{target}: {error}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {SERVICE}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
