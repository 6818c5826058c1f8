"""Run credential commands from a small helper process instead of the server.

Starting a command forks the process that starts it, and a fork copies the
parent's page tables: from a gateway holding a large view (hundreds of MB) each
fork blocks the event loop for about 20 ms, so a boot storm with a ``process``
credential source would stall every other request.  The helper is started once,
stays small, and does the forking; requests and answers travel as JSON lines
over its standard input and output.

Request: ``{"id": N, "argv": [...]}`` or ``{"cancel": N}``.
Answer: ``{"id": N, "rc": R, "out": base64, "err": base64}`` or ``{"id": N, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import sys

log = logging.getLogger("edge.metadata")

MAX_OUTPUT = 64 * 1024
"""Bytes of a command's output kept (more is an error for the caller to report)."""


class CommandError(OSError):
    """The command could not be run (not found, not executable, helper gone)."""


class CommandRunner:
    """Runs commands through the helper process, starting (and restarting) it as needed."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, bytes, bytes]]] = {}
        self._ids = itertools.count(1)
        self._starting: asyncio.Lock | None = None

    async def run(self, argv: list[str]) -> tuple[int, bytes, bytes]:
        """(exit status, output, error output) of ``argv``; cancelling the call kills the command."""
        process = await self._ensure()
        request_id = next(self._ids)
        future: asyncio.Future[tuple[int, bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._send(process, {"id": request_id, "argv": argv})
            return await future
        except asyncio.CancelledError:
            if process.returncode is None:
                self._send(process, {"cancel": request_id})
            raise
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if self._reader is not None:
            self._reader.cancel()

    @staticmethod
    def _send(process: asyncio.subprocess.Process, message: dict[str, object]) -> None:
        assert process.stdin is not None
        process.stdin.write(json.dumps(message).encode() + b"\n")

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._process is None or self._process.returncode is not None:
                self._process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edge.metadata.spawner", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE)
                self._reader = asyncio.get_running_loop().create_task(self._read(self._process))
        return self._process

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            line = await process.stdout.readline()
            if not line:
                break
            try:
                message = json.loads(line)
                future = self._pending.get(message["id"])
            except (ValueError, KeyError, TypeError):
                continue
            if future is None or future.done():
                continue
            if "error" in message:
                future.set_exception(CommandError(str(message["error"])))
            else:
                future.set_result((int(message["rc"]), base64.b64decode(message["out"]),
                                   base64.b64decode(message["err"])))
        await process.wait()
        if process is self._process:
            # Not closed by us (close() lets go of the process first): say so once.
            log.warning("credential command helper exited status=%s; it is restarted on the next command",
                        process.returncode)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CommandError("the command helper exited"))


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    children: dict[int, asyncio.Task[None]] = {}

    def answer(message: dict[str, object]) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    async def run(request_id: int, argv: list[str]) -> None:
        try:
            child = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            answer({"id": request_id, "error": f"cannot run {argv[0] if argv else '?'}: {exc.strerror or exc}"})
            return
        try:
            stdout, stderr = await child.communicate()
        except asyncio.CancelledError:
            if child.returncode is None:
                child.kill()
                await child.wait()
            return
        answer({"id": request_id, "rc": child.returncode,
                "out": base64.b64encode(stdout[:MAX_OUTPUT + 1]).decode(),
                "err": base64.b64encode(stderr[:4096]).decode()})

    while line := await reader.readline():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "cancel" in message:
            task = children.pop(message["cancel"], None)
            if task is not None:
                task.cancel()
            continue
        request_id = message.get("id")
        argv = message.get("argv")
        if not isinstance(request_id, int) or not isinstance(argv, list) or not argv:
            continue
        task = loop.create_task(run(request_id, [str(a) for a in argv]))
        children[request_id] = task
        task.add_done_callback(lambda _t, i=request_id: children.pop(i, None))
    # Standard input closed: the server is gone or stopping; finish what runs, then exit.
    if children:
        await asyncio.wait(list(children.values()), timeout=5)


if __name__ == "__main__":
    asyncio.run(_serve())
