"""The Ray backend (``--backend ray``): every session is a named Ray actor, so any stateless front-end
can serve it. Imported only with that backend (its modules import ray); import each module by name:
this package itself imports nothing, so the registry's actor loads without torch.

- ``store``: ``RaySessionStore``, the front-end's ``Sessions``: joins the cluster, creates, finds,
  closes and expires sessions, and tells an actor's failure as the domain error that says so
- ``lost``: how a lost session is told (SESSION_LOST with its last checkpoint) and listed
- ``proxy``: ``RayEngine``, a session's ``Engine`` in the front-end: one forwarder over the protocol
- ``actor``: ``SessionActor``, one session's ``SessionEngine`` in a Ray actor on some node
- ``registry``: ``SessionRegistry``, the actor on the head node that knows every session's owner,
  state and last checkpoint, and keeps the session limits for the whole cluster; its table is in the
  GCS, so it restarts with it
- ``watchdog``: a session actor's own expiry, for when no front-end is left to expire it
- ``access``: the check that the cluster accepts this front-end (Ray's token authentication)
"""
