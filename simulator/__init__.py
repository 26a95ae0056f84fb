"""A faithful local stand-in for the Kling multi-image2video API, with fault knobs for tests.

`main(argv)` runs it (also `python -m simulator`); see simulator.cli for flags and simulator.knobs
for every fault knob. It imports no project code.
"""

from simulator.cli import main

__all__ = ["main"]
