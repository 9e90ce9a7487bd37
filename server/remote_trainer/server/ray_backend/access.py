"""``check_access``: a front-end that the Ray cluster will refuse says so at once, in one line.

Ray 2.60 clusters started with a token (``ray start --head`` when ``RAY_AUTH_TOKEN``, a token file
or ``RAY_AUTH_MODE=token`` is there) refuse processes without it; ``ray.init`` then retries for
about 20 s and ends in a long traceback. Before ``ray.init``, one GCS call tells: the cluster's GCS
answers ``InvalidAuthToken`` within milliseconds. An explicit address never turns token mode on by
itself (Ray's rule), so the front-end needs ``RAY_AUTH_MODE=token`` and the token
(``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) in its environment, as every node does.
"""

from __future__ import annotations

import logging

from remote_trainer.engine.errors import FailedPrecondition

log = logging.getLogger(__name__)


def check_access(address: str) -> None:
    """Raises FailedPrecondition RAY_AUTHENTICATION_FAILED when the cluster at ``address`` (a GCS
    address or "auto"; Ray Client addresses are not checked) refuses this process's credentials."""
    if not address or address.startswith("ray://"):
        return
    try:  # Ray's own internals, as ray.init uses them: another Ray version leaves the check to ray.init
        from ray._private import services
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    if address == "auto":
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # as ray.init does for "auto"
    try:
        GcsClient(address=services.canonicalize_bootstrap_address_or_die(address))
    except AuthenticationError:
        raise FailedPrecondition(
            f"the Ray cluster at {address} uses token authentication and refuses this front-end's token (or its "
            "lack of one): start it with RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH), as on every node",
            "RAY_AUTHENTICATION_FAILED",
        ) from None
    except Exception as exc:  # noqa: BLE001 - unreachable or not a cluster: ray.init tells it in its words
        log.debug("Ray access check of %s: %s", address, exc)
