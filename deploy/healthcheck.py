#!/usr/bin/env python3
"""Container health check: ask the server's gRPC health service (grpc.health.v1).

Exits 0 when the trainer service reports SERVING and 1 otherwise (not yet
started, shutting down, or unreachable), as Docker's HEALTHCHECK expects.
It talks to 127.0.0.1 on TRAINER_PORT (the server listens on 0.0.0.0 in the
image); TRAINER_HEALTHCHECK_TARGET (host:port) overrides that.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "trainer.v1.TrainerService"


def main() -> int:
    target = os.environ.get("TRAINER_HEALTHCHECK_TARGET") or "127.0.0.1:" + os.environ.get("TRAINER_PORT", "50051")
    timeout = float(os.environ.get("TRAINER_HEALTHCHECK_TIMEOUT", "3"))
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
    except grpc.RpcError as error:
        print(f"{target}: {error.code().name}: {error.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {SERVICE}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
