"""``python -m remote_trainer.client.cli``: the same as ``trainer-client``."""

import sys

from remote_trainer.client.cli import main

sys.exit(main())
