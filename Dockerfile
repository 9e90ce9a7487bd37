# The trainer gRPC server (a torchvision resnet18 trained step by step by
# remote clients), for GPU hosts. torch from PyPI is the CUDA build, so the
# same image runs on an NVIDIA GPU (through the NVIDIA container toolkit) and
# on CPU. See docs/deployment.md.
#
#   docker build -t resnet-trainer .
#
# Layers are ordered so that a change to the code rebuilds only the small last
# ones: the ~5.5 GB of pinned dependencies are installed from
# deploy/requirements.lock alone, before any source is copied.
FROM python:3.11-slim-bookworm

# Where pip finds packages at build time: PyPI unless a build arg says
# otherwise. pip reads these PIP_* variables itself, and a build arg that is
# not given is not set at all, so a plain build uses PyPI. A host without
# internet access builds this file unchanged with, for example,
#   --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:8000/
# (deploy/offline-build.py serves a local wheel directory that way).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The server runs as this unprivileged user. /data (weight files, and
# checkpoints in /data/checkpoints) and /cache/torch (the torch hub cache,
# where ImageNet weights are looked for) are the mount points of the compose
# volumes; a new named volume takes its content and ownership from the image.
RUN groupadd --system --gid 10001 trainer \
    && useradd --system --uid 10001 --gid trainer --no-log-init \
        --home-dir /home/trainer --create-home --shell /usr/sbin/nologin trainer \
    && mkdir -p /data/checkpoints /cache/torch/hub/checkpoints \
    && chown -R trainer:trainer /data /cache

# Dependencies, pinned (deploy/lock.sh writes the lock from protos/ and server/pyproject.toml).
# A virtual environment keeps them apart from the base image's Python.
COPY deploy/requirements.lock /tmp/requirements.lock
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# The server side of the project only: the contract (protos/) and the server
# with its engine (server/), never the client SDK. Without dependencies: they
# are all in place, and `pip check` fails the build if the lock no longer
# satisfies server/pyproject.toml.
COPY . /tmp/src
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src/protos /tmp/src/server \
    && pip check \
    && rm -rf /tmp/src
COPY deploy/healthcheck.py /usr/local/bin/trainer-healthcheck

# Configuration is by environment; every flag of trainer-server has a
# TRAINER_* twin (trainer-server --help lists them).
# Prometheus metrics are served over HTTP on 9464.
ENV TRAINER_HOST=0.0.0.0 \
    TRAINER_PORT=50051 \
    TRAINER_DATA_DIR=/data \
    TRAINER_CHECKPOINT_DIR=/data/checkpoints \
    TRAINER_METRICS_PORT=9464 \
    TORCH_HOME=/cache/torch

# Numeric, so that a runtime can check it is not root without the image's
# /etc/passwd (Kubernetes runAsNonRoot does).
USER 10001:10001
WORKDIR /home/trainer
EXPOSE 50051 9464

# Healthy means the gRPC health service answers SERVING for the trainer
# service, not merely that the port is open.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["trainer-healthcheck"]

# Exec form: the server is PID 1 and gets the SIGTERM of `docker stop`
# itself; it then reports NOT_SERVING, lets in-flight calls finish for
# TRAINER_GRACE_SECONDS (10 s) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["trainer-server"]
