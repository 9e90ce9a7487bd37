"""``python -m remote_trainer.server`` / ``trainer-server``: run the training service."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from remote_trainer.engine.errors import TrainerError
from remote_trainer.server.settings import parse_settings
from remote_trainer.server.signals import StopSignals


def main(argv: Sequence[str] | None = None) -> int:
    """Parses flags, configures logging and serves until SIGTERM; 0 on a clean stop, a signal during
    start-up included (its handlers come first)."""
    stop = StopSignals().install()
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("remote_trainer.server").debug("starting (SIGTERM or SIGINT stops the server from here on)")
    from remote_trainer.server.app import serve  # imports torch: after the flags are known to be good

    try:
        serve(settings, stop)
    except TrainerError as exc:
        logging.getLogger("remote_trainer.server").error("cannot start: %s", exc.message)
        if exc.reason == "IMAGENET_WEIGHTS_MISSING":  # clients are never told server paths; the operator is
            from remote_trainer.engine.models import imagenet_weights_path

            logging.getLogger("remote_trainer.server").error("the weights file belongs at %s", imagenet_weights_path())
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
