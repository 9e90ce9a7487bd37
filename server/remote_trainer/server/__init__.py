"""The training service's gRPC server: settings and the process (``app``, ``__main__``), the servicer
and the RPC machinery under it (``rpc``, ``calls``, ``streams``, ``status``, ``dispatch``, ``auth``,
``events``), the session stores (``sessions``; ``ray_backend`` with ``--backend ray``) and the
conversions to the engine's types (``convert``). The torch work is ``remote_trainer.engine``."""
