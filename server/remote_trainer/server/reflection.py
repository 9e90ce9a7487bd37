"""Server reflection that serves trainer.proto (and errors.proto, the catalogue of error reasons) with
their comments.

The generated ``_pb2`` modules keep no source info, so reflection built on them would send
descriptors without comments and ``grpcurl describe`` would print bare fields. scripts/gen-protos.sh
also writes ``trainer.binpb``, the descriptor set with source info; this pool answers reflection's
look-ups from the default pool but hands out those fuller file descriptors.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection

from remote_trainer.contract.trainer.v1 import errors_pb2, trainer_pb2  # noqa: F401 (errors_pb2: see below)

DESCRIPTOR_SET = Path(trainer_pb2.__file__).with_name("trainer.binpb")
# errors_pb2 is imported for its effect: it puts errors.proto in the default pool, so that
# `grpcurl describe trainer.v1.ErrorReason` finds the catalogue of reasons.


class _FileWithSource:
    """A file descriptor whose ``CopyToProto`` gives the version with comments when there is one."""

    def __init__(self, descriptor: Any, sources: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        self._descriptor = descriptor
        self._sources = sources
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[_FileWithSource]:
        return [_FileWithSource(d, self._sources) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802 (protobuf's name)
        source = self._sources.get(self.name)
        if source is not None:
            proto.CopyFrom(source)
        else:
            self._descriptor.CopyToProto(proto)


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """Clears the json_name protoc writes into descriptor sets (the generated code has none), so
    grpcurl prints fields by their proto names (forward_id), as it does for the generated descriptors."""
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        _drop_json_names(message.nested_type)


class SourceInfoPool:
    """The default descriptor pool, with file descriptors carrying source info where we have it."""

    def __init__(self, descriptor_set: Path = DESCRIPTOR_SET) -> None:
        self._pool = descriptor_pool.Default()
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
        for f in files:
            _drop_json_names(f.message_type)
        self._sources = {f.name: f for f in files}

    def FindFileByName(self, name: str) -> _FileWithSource:  # noqa: N802
        return _FileWithSource(self._pool.FindFileByName(name), self._sources)

    def FindFileContainingSymbol(self, symbol: str) -> _FileWithSource:  # noqa: N802
        return _FileWithSource(self._pool.FindFileContainingSymbol(symbol), self._sources)

    def __getattr__(self, name: str) -> Any:  # FindMessageTypeByName, FindExtensionByNumber, ...
        return getattr(self._pool, name)


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Turns on reflection for ``service_names`` (plus reflection itself), with trainer.proto's comments."""
    pool: Any = SourceInfoPool()  # duck-typed: reflection calls only the look-ups above
    reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME), server, pool=pool)
