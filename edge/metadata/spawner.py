"""Run credential commands from a small helper process instead of the server.

Starting a command forks the process that starts it, and a fork copies the
parent's page tables: from a gateway holding a large view (hundreds of MB) each
fork blocks the event loop for about 20 ms, so a boot storm with a ``process``
credential source would stall every other request.  The helper is started once,
stays small, and does the forking.

Requests and answers travel over the helper's standard input and output as
frames: a 4-byte big-endian length, then that many bytes of JSON.  A length
prefix, unlike a line, has no size limit of its own, so the only limit on a
command's output is the cap the caller asks for.

Request: ``{"id": N, "argv": [...], "max_output": BYTES}`` or ``{"cancel": N}``.
Answer: ``{"id": N, "rc": R, "out": base64, "err": base64}`` or ``{"id": N, "error": "..."}``
(a command that prints more than ``max_output`` bytes is stopped and answered with an error).

A helper that exits on its own or answers something that is not a frame of
this protocol is logged, counted (``failures``), stopped, and replaced on the
next call; the calls it was running fail with :class:`CommandError`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import itertools
import json
import logging
import os
import signal
import struct
import sys
from typing import Any

log = logging.getLogger("edge.metadata")

DEFAULT_MAX_OUTPUT = 64 * 1024
"""Bytes of standard output a command may print unless the caller allows more."""
MAX_OUTPUT_LIMIT = 16 * 1024 * 1024
"""The largest cap a caller may ask for (configuration refuses more)."""
ERROR_OUTPUT_KEPT = 4096
"""Bytes of a command's standard error kept for the caller's message (the rest is read and dropped)."""

_LENGTH = struct.Struct(">I")


def _base64_size(size: int) -> int:
    return 4 * ((size + 2) // 3)


FRAME_LIMIT = _base64_size(MAX_OUTPUT_LIMIT) + _base64_size(ERROR_OUTPUT_KEPT) + 4096
"""The longest answer frame a well-behaved helper can send; a longer one means the helper is broken."""


class CommandError(OSError):
    """The command could not be run or finish properly (not found, output over the cap, helper gone)."""


class HelperProtocolError(Exception):
    """The helper sent something that is not an answer frame."""


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return _LENGTH.pack(len(body)) + body


async def read_frame(stream: asyncio.StreamReader, limit: int) -> dict[str, Any] | None:
    """The next frame's message; None at a clean end of stream (between frames)."""
    try:
        head = await stream.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise HelperProtocolError("stream ended inside a frame header") from None
        return None
    (size,) = _LENGTH.unpack(head)
    if size > limit:
        raise HelperProtocolError(f"frame of {size} bytes is over the {limit}-byte limit")
    try:
        body = await stream.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise HelperProtocolError(f"stream ended after {len(exc.partial)} of {size} frame bytes") from None
    try:
        message = json.loads(body)
    except ValueError:
        raise HelperProtocolError(f"frame of {size} bytes is not JSON") from None
    if not isinstance(message, dict):
        raise HelperProtocolError("frame is not a JSON object")
    return message


def _outcome(message: dict[str, Any]) -> tuple[int, tuple[int, bytes, bytes] | CommandError]:
    """(request id, result or error) of an answer frame."""
    request_id = message.get("id")
    if not isinstance(request_id, int):
        raise HelperProtocolError("answer without an integer id")
    if "error" in message:
        return request_id, CommandError(str(message["error"]))
    rc, out, err = message.get("rc"), message.get("out"), message.get("err")
    if not isinstance(rc, int) or not isinstance(out, str) or not isinstance(err, str):
        raise HelperProtocolError(f"answer {request_id} lacks rc, out or err")
    try:
        return request_id, (rc, base64.b64decode(out, validate=True), base64.b64decode(err, validate=True))
    except binascii.Error:
        raise HelperProtocolError(f"answer {request_id} is not base64") from None


class CommandRunner:
    """Runs commands through the helper process, starting (and restarting) it as needed."""

    def __init__(self, helper: tuple[str, ...] = (sys.executable, "-m", "edge.metadata.spawner")) -> None:
        self.helper = helper
        """The helper's argv (tests substitute a misbehaving one)."""
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, bytes, bytes]]] = {}
        self._ids = itertools.count(1)
        self._starting: asyncio.Lock | None = None
        self.failures: dict[str, int] = {"exited": 0, "protocol": 0}
        """Helpers lost, by reason: ``exited`` on their own, or stopped for a ``protocol`` error."""

    async def run(self, argv: list[str], max_output: int = DEFAULT_MAX_OUTPUT) -> tuple[int, bytes, bytes]:
        """(exit status, output, error output) of ``argv``; cancelling the call kills the command.

        A command printing more than ``max_output`` bytes is stopped and raises CommandError."""
        process = await self._ensure()
        request_id = next(self._ids)
        future: asyncio.Future[tuple[int, bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._send(process, {"id": request_id, "argv": argv, "max_output": max_output})
            return await future
        except asyncio.CancelledError:
            if process.returncode is None and process is self._process:
                self._send(process, {"cancel": request_id})
            raise
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        """Stop the helper (the runner stays usable: the next call starts a new one)."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except asyncio.TimeoutError:
                _kill_group(process)
                await process.wait()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    @staticmethod
    def _send(process: asyncio.subprocess.Process, message: dict[str, object]) -> None:
        assert process.stdin is not None
        if process.stdin.is_closing():
            raise CommandError("the command helper is gone")
        process.stdin.write(encode_frame(message))

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._process is None or self._process.returncode is not None:
                try:
                    # Its own process group: stopping a broken helper stops the commands it runs too.
                    self._process = await asyncio.create_subprocess_exec(
                        *self.helper, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        start_new_session=True)
                except OSError as exc:
                    raise CommandError(f"cannot start the command helper: {exc.strerror or exc}") from None
                self._reader = asyncio.get_running_loop().create_task(self._read(self._process))
        return self._process

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        broken = ""
        try:
            while (message := await read_frame(process.stdout, FRAME_LIMIT)) is not None:
                request_id, outcome = _outcome(message)
                future = self._pending.get(request_id)
                if future is None or future.done():
                    continue  # the caller gave up (cancelled or timed out) before the answer came
                if isinstance(outcome, CommandError):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        except asyncio.CancelledError:
            raise
        except HelperProtocolError as exc:
            broken = str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever broke the reader, the helper is replaced
            broken = f"{type(exc).__name__}: {exc}"
        if broken:
            _kill_group(process)
        await process.wait()
        if process is self._process:
            # Not closed by us (close() lets go of the process first): say why, once.
            self._process = None
            if broken:
                self.failures["protocol"] += 1
                log.error("credential command helper stopped: protocol error (%s); "
                          "a new one starts on the next command", broken)
            else:
                self.failures["exited"] += 1
                log.warning("credential command helper exited status=%s; a new one starts on the next command",
                            process.returncode)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CommandError(
                    f"the command helper broke ({broken})" if broken else "the command helper exited"))


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the helper and every command it still runs (they share its process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    """(up to ``cap`` bytes of the stream, whether it had more)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(65536):
        if size + len(chunk) > cap:
            chunks.append(chunk[:cap - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


async def _read_kept(stream: asyncio.StreamReader, kept: int) -> bytes:
    """The first ``kept`` bytes of the stream, reading (and dropping) the rest so the command never blocks."""
    head, more = await _read_capped(stream, kept)
    if more:
        while await stream.read(65536):
            pass
    return head


def _forget(children: dict[int, asyncio.Task[None]], request_id: int, _finished: object) -> None:
    children.pop(request_id, None)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    children: dict[int, asyncio.Task[None]] = {}

    def answer(message: dict[str, object]) -> None:
        out.write(encode_frame(message))
        out.flush()

    async def run(request_id: int, argv: list[str], max_output: int) -> None:
        try:
            child = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            answer({"id": request_id, "error": f"cannot run {argv[0] if argv else '?'}: {exc.strerror or exc}"})
            return
        assert child.stdout is not None and child.stderr is not None
        errors = asyncio.ensure_future(_read_kept(child.stderr, ERROR_OUTPUT_KEPT))
        try:
            stdout, too_long = await _read_capped(child.stdout, max_output)
            if too_long:
                child.kill()
            stderr = await errors
            await child.wait()
        except asyncio.CancelledError:
            errors.cancel()
            if child.returncode is None:
                child.kill()
                await child.wait()
            return
        if too_long:
            answer({"id": request_id, "error": f"{argv[0]} printed more than {max_output} bytes (stopped)"})
            return
        answer({"id": request_id, "rc": child.returncode, "out": base64.b64encode(stdout).decode(),
                "err": base64.b64encode(stderr).decode()})

    while True:
        try:
            message = await read_frame(reader, 1 << 20)
        except HelperProtocolError:
            break  # the server side is broken: stop as if standard input had closed
        if message is None:
            break
        if "cancel" in message:
            task = children.pop(message["cancel"], None)
            if task is not None:
                task.cancel()
            continue
        request_id = message.get("id")
        argv = message.get("argv")
        max_output = message.get("max_output", DEFAULT_MAX_OUTPUT)
        if not isinstance(request_id, int) or not isinstance(argv, list) or not argv:
            continue
        if not isinstance(max_output, int) or not 0 < max_output <= MAX_OUTPUT_LIMIT:
            max_output = DEFAULT_MAX_OUTPUT
        task = loop.create_task(run(request_id, [str(a) for a in argv], max_output))
        children[request_id] = task
        task.add_done_callback(functools.partial(_forget, children, request_id))
    # Standard input closed: the server is gone or stopping; finish what runs, then exit.
    if children:
        await asyncio.wait(list(children.values()), timeout=5)


if __name__ == "__main__":
    asyncio.run(_serve())
