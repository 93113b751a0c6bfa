"""``python3 -m kelpie``: the command-line tool (see kelpie.cli)."""

import sys

from .cli import main

sys.exit(main())
