"""`python -m kling_relay.simulator ...`: run the Kling simulator (see kling_relay.simulator.cli)."""

import sys

from kling_relay.simulator.cli import main

raise SystemExit(main(sys.argv[1:]))
