"""The floor for the metadata load test: uvloop + httptools answering fixed bytes, nothing else.

``python bench/metadata_bare.py`` prints ``port=N`` and serves until SIGTERM.  It parses each
request like edge does and writes the same response edge would, without identifying, authorising
or looking anything up, so edge's cost above it is the cost of being a metadata service.
"""

from __future__ import annotations

import asyncio
import signal

import httptools
import uvloop

BODY = b"i-0de0000000000001"
HEAD = b"HTTP/1.1 200 OK\r\nServer: EC2ws\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP = HEAD + b"\r\n" + BODY
CLOSE = HEAD + b"Connection: close\r\n\r\n" + BODY


class Bare(asyncio.Protocol):
    __slots__ = ("transport", "parser", "url")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        # The parser refers back to this protocol: without breaking that cycle every connection is
        # left to the cycle collector (edge breaks it the same way), which the floor should not pay.
        del self.parser

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url.append(url)

    def on_message_complete(self) -> None:
        self.url = []
        assert self.transport is not None
        if self.parser.should_keep_alive():
            self.transport.write(KEEP)
        else:
            self.transport.write(CLOSE)
            self.transport.close()


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", 0, backlog=2048)
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(main())
