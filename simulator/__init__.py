"""A faithful local stand-in for the Kling multi-image2video API, with fault knobs for tests.

`main(argv)` runs it (also `python -m kling_relay.simulator`); see kling_relay.simulator.cli for flags and
kling_relay.simulator.knobs for every fault knob. It imports no project code.
"""

from kling_relay.simulator.cli import main

__all__ = ["main"]
