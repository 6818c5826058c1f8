"""Datagrams in and out of a UDP socket a batch at a time.

A listener wakes up, takes everything waiting (up to ``BATCH`` datagrams),
answers it, and sends the replies together.  On 64-bit Linux that is one
``recvmmsg`` and one ``sendmmsg`` per batch, called through ctypes on
buffers allocated once: per datagram it saves the two system calls and the
Python socket calls around them, and a batch of replies wakes the client
once rather than once per reply.  Elsewhere :class:`SocketDatagrams` does the
same with ``recvfrom`` and ``sendto``.

Both keep the source's socket address where the reply is written from, so
an answer goes back exactly where the query came from.  A reply the kernel
will not take (send buffer full, ``ENOBUFS``, the client's route gone) is
dropped and counted, as a UDP server does: the listener never blocks.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

BATCH = 64
"""Datagrams taken per wake-up; the loop runs other callbacks (TCP, timers) between batches."""

_SLOT = 65536
"""Room per datagram: any UDP payload fits, so no query is cut short."""

_NAME = 32
"""Room per socket address (sockaddr_in6 is 28 bytes)."""

_MSG_DONTWAIT = 0x40
_ADDRESS_MEMO_LIMIT = 65536
_SEND_GIVE_UP = frozenset({errno.EAGAIN, errno.ENOBUFS})
"""Send errors that mean "no room now": the rest of the batch is dropped rather than retried."""


class SocketDatagrams:
    """``recvfrom``/``sendto`` one datagram at a time, up to ``BATCH`` per wake-up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sources: list[tuple[Any, ...]] = []
        self._dropped = 0

    def receive(self) -> list[tuple[bytes, str]]:
        """(payload, source address) of every datagram waiting, up to ``BATCH``."""
        recvfrom = self.sock.recvfrom
        sources: list[tuple[Any, ...]] = []
        received = []
        try:
            for _ in range(BATCH):
                data, source = recvfrom(_SLOT)
                sources.append(source)
                received.append((data, source[0]))
        except OSError:
            pass  # nothing more waiting (or an error report for an earlier reply: nothing to do)
        self.sources = sources
        return received

    def source(self, index: int) -> tuple[Any, ...]:
        """The socket address of datagram ``index`` of the last batch, for a reply sent later."""
        return self.sources[index]

    def send(self, replies: list[bytes | None]) -> int:
        """Send ``replies[index]`` to the source of datagram ``index`` of the last batch (None: no reply);
        return how many the kernel would not take."""
        sendto = self.sock.sendto
        sources = self.sources
        dropped = 0
        for index, reply in enumerate(replies):
            if reply is not None:
                try:
                    sendto(reply, sources[index])
                except OSError:
                    dropped += 1
        return dropped


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("length", ctypes.c_uint)]


def _libc_calls() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """(recvmmsg, sendmmsg) from the C library, or None where they or the layout read below are not available."""
    if (sys.byteorder != "little" or ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(_MMsgHdr) != 64
            or _MMsgHdr.length.offset != 56):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_CALLS = _libc_calls()


class BatchDatagrams:
    """``recvmmsg``/``sendmmsg`` on buffers allocated once per socket (64-bit Linux)."""

    def __init__(self, sock: socket.socket) -> None:
        assert _CALLS is not None
        self._recvmmsg, self._sendmmsg = _CALLS
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        namelen = 16 if sock.family == socket.AF_INET else 28
        # Anonymous mappings: only the pages a datagram touches become resident (the first of each slot).
        self._in = mmap.mmap(-1, BATCH * _SLOT)
        self._out = mmap.mmap(-1, BATCH * _SLOT)
        self._names = (ctypes.c_char * (BATCH * _NAME))()
        in_base = ctypes.addressof(ctypes.c_char.from_buffer(self._in))
        out_base = ctypes.addressof(ctypes.c_char.from_buffer(self._out))
        names_base = ctypes.addressof(self._names)
        self._in_vectors = (_IoVec * BATCH)()
        self._out_vectors = (_IoVec * BATCH)()
        self._in_headers = (_MMsgHdr * BATCH)()
        self._out_headers = (_MMsgHdr * BATCH)()
        for index in range(BATCH):
            self._in_vectors[index].base = in_base + index * _SLOT
            self._in_vectors[index].length = _SLOT
            header = self._in_headers[index].hdr
            header.name = names_base + index * _NAME
            header.namelen = namelen  # the kernel writes back the same length for every source of this family
            header.iov = ctypes.addressof(self._in_vectors) + index * ctypes.sizeof(_IoVec)
            header.iovlen = 1
            self._out_vectors[index].base = out_base + index * _SLOT
            header = self._out_headers[index].hdr
            header.namelen = namelen
            header.iov = ctypes.addressof(self._out_vectors) + index * ctypes.sizeof(_IoVec)
            header.iovlen = 1
        self._in_address = ctypes.addressof(self._in_headers)
        self._out_address = ctypes.addressof(self._out_headers)
        self._names_base = names_base
        # Word views of the headers: the per-datagram work is a few indexed loads and stores.
        self._in_lengths = memoryview(self._in_headers).cast("B").cast("I")[_MMsgHdr.length.offset // 4::16]
        self._out_words = memoryview(self._out_headers).cast("B").cast("Q")
        self._out_lengths = memoryview(self._out_vectors).cast("B").cast("Q")
        self._out_view = memoryview(self._out)
        self._names_view = memoryview(self._names).cast("B")
        self._name_words = self._names_view.cast("Q")
        self._addresses: dict[object, str] = {}

    def receive(self) -> list[tuple[bytes, str]]:
        """(payload, source address) of every datagram waiting, up to ``BATCH``."""
        count = self._recvmmsg(self.fd, self._in_address, BATCH, _MSG_DONTWAIT, None)
        if count <= 0:
            return []  # nothing waiting (EAGAIN), or an error report for an earlier reply: nothing to do
        lengths = self._in_lengths
        view = self._in  # slicing the mapping itself gives bytes in one step
        addresses = self._addresses
        received = []
        if self.family == socket.AF_INET:
            words = self._name_words
            for index in range(count):
                # family, port and address in one word; the address alone names the client.
                key = words[index * 4] >> 32
                address = addresses.get(key)
                if address is None:
                    address = self._address(index, key)
                start = index * _SLOT
                received.append((view[start:start + lengths[index]], address))
        else:
            names = self._names_view
            for index in range(count):
                name_key = names[index * _NAME + 8:index * _NAME + 28].tobytes()  # address and scope
                address = addresses.get(name_key)
                if address is None:
                    address = self._address(index, name_key)
                start = index * _SLOT
                received.append((view[start:start + lengths[index]], address))
        return received

    def _address(self, index: int, key: object) -> str:
        """The text form of datagram ``index``'s source address, as ``recvfrom`` would give it."""
        source = self.source(index)
        if len(self._addresses) >= _ADDRESS_MEMO_LIMIT:
            self._addresses.clear()
        self._addresses[key] = source[0]
        return source[0]

    def source(self, index: int) -> tuple[Any, ...]:
        """The socket address of datagram ``index`` of the last batch, for a reply sent later."""
        name = self._names_view[index * _NAME:(index + 1) * _NAME].tobytes()
        if self.family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, name[4:8]), struct.unpack("!H", name[2:4])[0]
        port, flowinfo = struct.unpack("!HI", name[2:8])
        scope = struct.unpack("=I", name[24:28])[0]
        host = socket.inet_ntop(socket.AF_INET6, name[8:24])
        if scope:
            # recvfrom names link-local sources with their interface, as getnameinfo does.
            host = socket.getnameinfo((host, port, flowinfo, scope), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
        return host, port, flowinfo, scope

    def send(self, replies: list[bytes | None]) -> int:
        """Send ``replies[index]`` to the source of datagram ``index`` of the last batch (None: no reply),
        all in one ``sendmmsg`` when the kernel takes them; return how many it would not take."""
        out = self._out_view
        lengths = self._out_lengths
        words = self._out_words
        names_base = self._names_base
        pending = 0
        for index, reply in enumerate(replies):
            if reply is not None:
                start = pending * _SLOT
                size = len(reply)
                out[start:start + size] = reply
                lengths[pending * 2 + 1] = size
                words[pending * 8] = names_base + index * _NAME  # replies are packed: gaps move them ahead
                pending += 1
        if not pending:
            return 0
        sent = dropped = 0
        while sent < pending:
            count = self._sendmmsg(self.fd, self._out_address + sent * 64, pending - sent, _MSG_DONTWAIT)
            if count > 0:
                sent += count
                continue
            if ctypes.get_errno() in _SEND_GIVE_UP:
                return dropped + pending - sent
            # This reply cannot be sent (its route is gone, say); the rest may.
            dropped += 1
            sent += 1
        return dropped


def datagrams_for(sock: socket.socket) -> SocketDatagrams | BatchDatagrams:
    """The fastest way this platform offers to move batches of datagrams on ``sock``."""
    if _CALLS is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        return BatchDatagrams(sock)
    return SocketDatagrams(sock)
