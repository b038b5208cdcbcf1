"""``python -m distmlip``: the command line."""

import sys

from distmlip.cli import main

sys.exit(main())
