"""``python -m jobbroker_server`` is the ``broker`` command."""

import sys

from jobbroker_server.cli import main

sys.exit(main())
