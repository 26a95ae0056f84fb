"""The `kling-relay` command: one entry point, thin subcommands over shared/ functions."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kling_relay.shared import limits

if TYPE_CHECKING:
    from kling_relay.shared.client import Relay


def _simulate(argv: Sequence[str]) -> int:
    from kling_relay.simulator import main as simulator_main

    return simulator_main(list(argv))


def _config(argv: Sequence[str]) -> int:
    from kling_relay.shared.settings import SettingsError, load_settings
    from kling_relay.shared.settings_spec import settings_table

    argparse.ArgumentParser(prog="kling-relay config", description="Check the environment's settings",
                            epilog=settings_table(), formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    _print_json(settings.redacted())
    return 0


def _doctor(argv: Sequence[str]) -> int:
    from kling_relay.shared.doctor import diagnose, render
    from kling_relay.shared.redis_conn import redis_client
    from kling_relay.shared.runtime import make_kling_client, make_s3_client
    from kling_relay.shared.settings import SettingsError, load_settings

    parser = argparse.ArgumentParser(
        prog="kling-relay doctor",
        description="Check what the relay needs, with the settings from the environment, without spending money "
                    "(nothing is created at Kling): Redis, S3 (a tiny object written and deleted under S3_PREFIX), "
                    "Kling's auth, read routes and answer shape, the clock, PUBLIC_BASE_URL and the video "
                    "allow-list; then what the relay will do (read tasks back, or run callbacks-only). Exit status: "
                    "0 ready (maybe with warnings), 1 something it needs failed, 2 bad settings. "
                    "`kling-relay config` is the quick, offline view.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    client = redis_client(settings.redis_url, decode_responses=False, socket_timeout=5)
    try:
        report = diagnose(settings, kling_client=lambda session: make_kling_client(settings, session=session),
                          s3_client=make_s3_client(settings), redis_client=client)
    finally:
        client.close()
    if args.json:
        _print_json(report.as_dict())
    else:
        print(render(report, settings))
    return 0 if report.ready else 1


def _pause_command(argv: Sequence[str], *, what: str, description: str) -> int:
    """`kling-relay submission|copy status|resume`: print the status, or clear the pause."""
    parser = argparse.ArgumentParser(prog=f"kling-relay {what}", description=description)
    parser.add_argument("action", choices=["status", "resume"])
    args = parser.parse_args(argv)

    def act(relay: Relay) -> object:
        if args.action == "status":
            status = relay.status()
            return status if what == "submission" else {k: status[k] for k in ("copy", "copy_pause", "copy_waiting")}
        resume = relay.resume_submission if what == "submission" else relay.resume_copy
        cleared = resume(via=f"cli:{_user()}")
        return {"resumed": cleared is not None, "pause": cleared}

    return _with_relay(act)


def _with_relay(act: Callable[[Relay], object]) -> int:
    """Run `act` with a Relay from the environment and print its JSON: 0, 1 (Redis unreachable), 2 (settings)."""
    return _run_with_relay(lambda relay: _print_json(act(relay)))


def _run_with_relay(act: Callable[[Relay], None]) -> int:
    """Run `act` with a Relay from the environment, then close it: 0, 1 (Redis unreachable), 2 (settings)."""
    from redis.exceptions import RedisError

    relay = _open_relay()
    if relay is None:
        return 2
    try:
        act(relay)
        return 0
    except RedisError as exc:
        print(f"Redis did not answer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        relay.close()


def _submission(argv: Sequence[str]) -> int:
    return _pause_command(argv, what="submission",
                          description="Is submission to Kling open or paused (after an account or auth error)? "
                                      "Resume it once the account or keys are fixed.")


def _copy(argv: Sequence[str]) -> int:
    return _pause_command(argv, what="copy",
                          description="Is copying to S3 open or paused (storage unusable: no bucket, access denied, "
                                      "no credentials), and which jobs wait on a setting? Resume copying once the "
                                      "bucket, credentials or policy are fixed.")


EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNSUCCESSFUL = 5


def _jobs_parser() -> argparse.ArgumentParser:
    from kling_relay.shared.jobs import JobState

    parser = argparse.ArgumentParser(
        prog="kling-relay jobs",
        description="Read and act on jobs, straight in Redis, with the settings from the environment (REDIS_URL "
                    "and the rest, as `kling-relay config` checks them). Prints JSON. Exit status: 0 done, "
                    f"1 Redis unreachable, 2 bad usage, settings or input (e.g. a --reason over 500 characters or "
                    f"not valid text, a --cursor this command did not print), {EXIT_NOT_FOUND} no such job (or an "
                    f"id that cannot be one), "
                    f"{EXIT_REFUSED} refused in the job's state (the reason is printed on stderr); `watch`: "
                    f"{EXIT_UNSUCCESSFUL} the job ended failed or canceled.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{get,list,watch,retry,cancel}")
    get = sub.add_parser("get", help="one job with its timeline")
    get.add_argument("job_id")
    watch = sub.add_parser("watch", help="follow one job to its end: a line per event of its timeline, then the "
                                         "outcome (exit 0 stored, 5 failed or canceled)")
    watch.add_argument("job_id")
    watch.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    listing = sub.add_parser("list", help="jobs newest first, one page")
    listing.add_argument("--state", choices=[s.value for s in JobState])
    listing.add_argument("--limit", type=int, default=limits.LIST_LIMIT_DEFAULT,
                         help=f"1 to {limits.LIST_LIMIT_MAX} (default {limits.LIST_LIMIT_DEFAULT})")
    listing.add_argument("--cursor", help="next_cursor of the previous page")
    listing.add_argument("--app", help="only this app's jobs (the name of its API token); default: every app's")
    for name, help_text in (("retry", "put a failed job back to work (copy or submit, per its failure)"),
                            ("cancel", "cancel a queued or in-flight job (a Kling task already made still runs)")):
        action = sub.add_parser(name, help=help_text)
        action.add_argument("job_id")
        action.add_argument("--reason", help="why, recorded in the job's timeline")
    return parser


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _jobs(argv: Sequence[str]) -> int:
    from redis.exceptions import RedisError

    from kling_relay.shared.inputs import safe_text
    from kling_relay.shared.jobs import JobNotFound
    from kling_relay.shared.ops import ActionRefused
    from kling_relay.shared.validation import ValidationFailed

    args = _jobs_parser().parse_args(argv)
    if args.action == "list" and not 1 <= args.limit <= limits.LIST_LIMIT_MAX:
        print(f"--limit must be from 1 to {limits.LIST_LIMIT_MAX}", file=sys.stderr)
        return 2
    relay = _open_relay()
    if relay is None:
        return 2
    try:
        if args.action == "watch":
            return _watch(relay, args.job_id, args.timeout)
        if args.action == "list":
            return _list(relay, args)
        if args.action == "get":
            job = relay.get(args.job_id)
            if job is None:
                raise JobNotFound(args.job_id)
        else:
            act = relay.retry if args.action == "retry" else relay.cancel
            job = act(args.job_id, reason=args.reason, via=f"cli:{_user()}")
        _print_json(job.public_dict(relay.store.events(job.id)))
        return 0
    except JobNotFound:
        print(f"no such job: {safe_text(args.job_id)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except ValidationFailed as exc:  # the checks of the HTTP API (shared/ops.py: check_action)
        for problem in exc.problems:
            print(f"--{problem.field}: {problem.problem}", file=sys.stderr)
        return 2
    except ActionRefused as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        return EXIT_REFUSED
    except RedisError as exc:
        print(f"Redis did not answer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        relay.close()


def _list(relay: Relay, args: argparse.Namespace) -> int:
    from kling_relay.shared.jobs import InvalidCursor

    try:
        jobs, cursor = relay.list(state=args.state, limit=args.limit, cursor=args.cursor, app=args.app)
    except InvalidCursor as exc:
        print(f"--cursor: {exc}", file=sys.stderr)
        return 2
    _print_json({"jobs": [j.public_dict() for j in jobs], "next_cursor": cursor})
    return 0


def _watch(relay: Relay, job_id: str, timeout: float | None) -> int:
    from kling_relay.shared.jobs import JobState
    from kling_relay.shared.top import watch

    try:
        job = watch(relay.store, job_id, out=sys.stdout, timeout=timeout)
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if job.state is JobState.STORED else EXIT_UNSUCCESSFUL


def _top(argv: Sequence[str]) -> int:
    from kling_relay.shared.top import top

    parser = argparse.ArgumentParser(prog="kling-relay top",
                                     description="A live view of the relay in the terminal, refreshed every second: "
                                                 "submission and copying open or paused (and why), jobs per state, "
                                                 "tasks in flight against KLING_MAX_IN_FLIGHT, Celery queue depths, "
                                                 "Kling units spent today. Reads Redis (REDIS_URL) only.")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    args = parser.parse_args(argv)

    def show(relay: Relay) -> None:
        try:
            top(relay.store, once=args.once)
        except KeyboardInterrupt:
            pass

    return _run_with_relay(show)


def _open_relay() -> Relay | None:
    """A Relay from the environment's settings, or None after printing what is wrong with them."""
    from kling_relay.shared.client import Relay
    from kling_relay.shared.settings import SettingsError

    try:
        return Relay.from_env()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return None


def _user() -> str:
    from kling_relay.shared.inputs import safe_text

    try:
        return safe_text(getpass.getuser())  # from the environment: maybe bytes that are not UTF-8
    except (OSError, KeyError):  # no login name in this environment
        return "unknown"


COMMANDS = {
    "simulate": (_simulate, "run the local Kling simulator (see `kling-relay simulate --help`)"),
    "jobs": (_jobs, "read and act on jobs in Redis: get, list, watch, retry, cancel (see `kling-relay jobs --help`)"),
    "top": (_top, "a live view of the relay in the terminal (see `kling-relay top --help`)"),
    "submission": (_submission, "submission to Kling: status (open/paused, why) or resume after a pause"),
    "copy": (_copy, "copying to S3: status (open/paused, why, jobs waiting) or resume after a pause"),
    "config": (_config, "check the settings from the environment and print them (secrets masked)"),
    "doctor": (_doctor, "check Redis, S3 and Kling (auth, read routes, clock) without spending money"),
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
