"""`python -m simulator ...`: run the Kling simulator (see simulator.cli)."""

import sys

from simulator.cli import main

raise SystemExit(main(sys.argv[1:]))
