"""remote-trainer: a gRPC training service for a torchvision resnet18.

- ``remote_trainer.contract``: the wire contract (generated trainer.v1 code, tensor codec, shared names)
- ``remote_trainer.engine``: the torch work of a session (no grpc)
- ``remote_trainer.server``: the gRPC server over the engine
- ``remote_trainer.client``: the Python SDK, the remote ``nn.Module`` and the ``trainer-client`` CLI

Importing this package imports nothing else: a thin client never loads torch or the server.
"""
