"""`simulator.main(argv)`: parse flags, start the server, run until SIGTERM/SIGINT.

Without key flags the simulator accepts the demo credentials: access key `demo-access-key`, secret
key `demo-secret-key` (JWT mode). `--api-key K` switches to a static Bearer API key (Kling's newer
official keys, or a reseller's). `--webhook-secret S` signs every callback per Standard Webhooks.
When ready it prints exactly one line on stdout, a JSON record `{"msg": "listening", "url": "http://host:port<prefix>",
...}`; its logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType

from kling_relay.simulator import logs
from kling_relay.simulator.app import SimulatorApp, normalize_prefix
from kling_relay.simulator.auth import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, Authenticator
from kling_relay.simulator.callbacks import signing_key
from kling_relay.simulator.knobs import add_knob_arguments, knobs_from_args
from kling_relay.simulator.server import SimHTTPServer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kling-relay simulate",
        description="A local stand-in for the Kling multi-image2video API, with fault knobs. "
                    f"Without key flags it accepts AK {DEMO_ACCESS_KEY!r} / SK {DEMO_SECRET_KEY!r}.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument("--prefix", default="", help="path prefix before /v1, e.g. /kling (reseller style)")
    parser.add_argument("--public-url", help="base of result URLs (default http://<host>:<port>)")
    parser.add_argument("--access-key", help="JWT mode: the access key (iss)")
    parser.add_argument("--secret-key", help="JWT mode: the HS256 secret key")
    parser.add_argument("--api-key", help="static Bearer API key mode (Kling's newer official API keys, which "
                                          "its docs prefer to the legacy AK/SK; or a reseller's key)")
    parser.add_argument("--webhook-secret", help="sign callbacks per Standard Webhooks with this secret "
                                                 "(whsec_<base64> as Kling's console issues it, or any string)")
    parser.add_argument("--jwt-leeway", type=float, default=5.0, help="seconds of clock skew allowed")
    parser.add_argument("--data-dir", help="where rendered videos go (default: a temp dir removed at exit)")
    parser.add_argument("--generation-workers", type=int, default=2, help="videos rendered at once")
    parser.add_argument("--callback-workers", type=int, default=8, help="callbacks delivered at once")
    parser.add_argument("--log-level", default="INFO")
    add_knob_arguments(parser)
    return parser


def _authenticator(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Authenticator:
    if args.api_key is not None:
        if args.access_key or args.secret_key:
            parser.error("--api-key cannot be combined with --access-key/--secret-key")
        return Authenticator(api_key=args.api_key, leeway=args.jwt_leeway)
    if (args.access_key is None) != (args.secret_key is None):
        parser.error("--access-key and --secret-key go together")
    return Authenticator(access_key=args.access_key or DEMO_ACCESS_KEY,
                         secret_key=args.secret_key or DEMO_SECRET_KEY, leeway=args.jwt_leeway)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    auth = _authenticator(parser, args)
    try:
        knobs = knobs_from_args(args)
        if args.webhook_secret:
            signing_key(args.webhook_secret)
    except ValueError as exc:
        parser.error(str(exc))
    logs.configure(args.log_level)
    own_dir = args.data_dir is None
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="kling-sim-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    server = SimHTTPServer((args.host, args.port))
    host, port = str(args.host), int(server.server_address[1])
    host_part = f"[{host}]" if ":" in host else host
    prefix = normalize_prefix(args.prefix)
    app = SimulatorApp(auth=auth, knobs=knobs, prefix=prefix, data_dir=data_dir,
                       public_url=args.public_url or f"http://{host_part}:{port}",
                       generation_workers=args.generation_workers, callback_workers=args.callback_workers,
                       webhook_secret=args.webhook_secret or None)
    server.app = app
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    serving = threading.Thread(target=server.serve_forever, name="sim-http", daemon=True)
    serving.start()
    print(logs.json_line("listening", url=f"http://{host_part}:{port}{prefix}"), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        app.close()
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0
