"""``python -m adaptwin``: the same command line as the ``adaptwin`` entry point."""

import sys

from adaptwin.cli import main

sys.exit(main())
