"""Writing to a TCP connection's socket directly, as the node's server and client do."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport

    class ITCPConnection(ITCPTransport, IPushProducer, IConsumer):
        """A TCP connection's transport as the fast server and client use it: written to,
        throttled (a push producer) and given producers (a consumer)."""


class SocketWriter:
    """Writes to a TCP transport's socket at once, as long as the socket takes all of it.

    Twisted's transport sends what is written only at the reactor's next turn, after two
    epoll registrations: for a small request or answer, more than the rest of its writing
    costs. Once the socket takes only part of something (or L{buffered} is called), that rest
    and every later write go to the transport, whose buffer was empty until then, so order
    is kept and the transport's flow control (producers) takes over.
    """

    __slots__ = ("transport", "_socket")

    #: Larger writes go to the transport whole: the rest of a partly sent one would be
    #: copied, on the reactor, for a saving that no longer counts.
    direct_up_to = 256 * 1024

    def __init__(self, transport: ITCPConnection) -> None:
        self.transport = transport
        handle = getattr(transport, "getHandle", None)
        sock = handle() if handle is not None else None
        self._socket = sock if isinstance(sock, socket.socket) else None

    def write(self, data: bytes) -> None:
        sock = self._socket
        if sock is not None and len(data) > self.direct_up_to:
            self._socket = sock = None
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._socket = None
        self.transport.write(data)

    def buffered(self) -> None:
        """From now on, write through the transport only."""
        self._socket = None
