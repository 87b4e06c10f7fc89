"""``python -m tierd`` is the ``tierd`` command."""

import sys

from tierd.cli import tierd_main

sys.exit(tierd_main())
