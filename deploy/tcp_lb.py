"""A small round-robin TCP load balancer: each new connection goes to the next backend that accepts one.

    python -m deploy.tcp_lb --listen 10.77.3.9:8000 --backend 10.77.3.7:8000 --backend 10.77.3.8:8000

The multi-host stack (deploy/hosts.py) runs it on its own host in front of two web hosts, as a cloud load
balancer would be: PUBLIC_BASE_URL names it, so the API's clients and the simulator's callbacks go through it.
A backend that refuses or times out (CONNECT_TIMEOUT) is skipped for that connection; a connection no backend
takes is closed. Bytes are copied both ways until either side closes (then the other is closed too).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging

CONNECT_TIMEOUT = 3.0
CHUNK = 64 * 1024

log = logging.getLogger("tcp_lb")


def host_port(raw: str) -> tuple[str, int]:
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"want host:port, got {raw!r}")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Balancer:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self._next = itertools.cycle(range(len(backends)))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            host, port = self.backends[next(self._next)]
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                log.warning("backend %s:%s refused: %s", host, port, type(exc).__name__)
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def serve(listen: tuple[str, int], backends: list[tuple[str, int]]) -> None:
    balancer = Balancer(backends)
    server = await asyncio.start_server(balancer.handle, listen[0], listen[1], backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", type=host_port, required=True)
    parser.add_argument("--backend", type=host_port, action="append", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args.listen, args.backend))


if __name__ == "__main__":
    main()
