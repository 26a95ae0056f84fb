"""The `kling-relay` command: one entry point, thin subcommands over shared/ functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _simulate(argv: Sequence[str]) -> int:
    from simulator import main as simulator_main

    return simulator_main(list(argv))


def _config(argv: Sequence[str]) -> int:
    from shared.settings import SettingsError, load_settings

    argparse.ArgumentParser(prog="kling-relay config", description="Check the environment's settings").parse_args(
        argv
    )
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(settings)
    return 0


COMMANDS = {
    "simulate": (_simulate, "run the local Kling simulator (see `kling-relay simulate --help`)"),
    "config": (_config, "check the settings from the environment and print them (secrets masked)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: kling-relay <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    handler, _ = COMMANDS[args[0]]
    return handler(args[1:])


if __name__ == "__main__":
    sys.exit(main())
