"""The least a Twisted HTTP relay can do: the benchmark's yardstick for what the node adds.

Usage: python benchmarks/bare_relay.py --port N --backend-port M [--alarm S]

One Twisted process on 127.0.0.1:N that relays each HTTP/1.1 request, byte for byte, to a
pooled keep-alive connection to 127.0.0.1:M, and the answer back, byte for byte, as it arrives
(a chunked SSE stream passes event by event). httptools finds where messages end; nothing is
routed, checked, rewritten or logged, and a request has at most one message in flight per
client connection (no pipelining). It is not a proxy anyone should run: it is what Python and
Twisted cost on this machine before any of the node's work (parsing a body, choosing a model,
limits, error answers, accounting), so the node's figures can be read against it.

It prints C{listening on 127.0.0.1:N} once it listens.
"""

import argparse
import signal

from httptools import HttpRequestParser, HttpResponseParser
from twisted.internet import protocol, reactor


def send(transport, data: bytes) -> None:
    """Write to the socket at once while it takes everything (as the node does)."""
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


class Backend(protocol.Protocol):
    """One pooled connection to the backend; relays one answer at a time to C{client}."""

    def __init__(self, relay: "Relay", first: bytes):
        self.relay = relay
        self.first = first
        self.client = None
        self.parser = HttpResponseParser(self)

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        send(self.transport, self.first)

    def dataReceived(self, data):
        if self.client.connected:  # else the answer is read to its end and dropped
            send(self.client.transport, data)
        self.parser.feed_data(data)

    def on_message_complete(self):
        self.client = None
        self.relay.idle.append(self)

    def connectionLost(self, reason=None):
        if self in self.relay.idle:
            self.relay.idle.remove(self)
        if self.client is not None:
            self.client.transport.loseConnection()


class Client(protocol.Protocol):
    """One client connection: each complete request goes to an idle backend connection."""

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.parser = HttpRequestParser(self)
        self.pending = []
        self.connected = True

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data):
        self.pending.append(data)
        self.parser.feed_data(data)

    def connectionLost(self, reason=None):
        self.connected = False

    def on_message_complete(self):
        data = b"".join(self.pending)
        self.pending = []
        idle = self.relay.idle
        if idle:
            backend = idle.pop()
            backend.client = self
            send(backend.transport, data)
        else:
            backend = Backend(self.relay, data)
            backend.client = self
            protocol.ClientCreator(reactor, lambda: backend).connectTCP(
                "127.0.0.1", self.relay.backend_port)


class Relay(protocol.ServerFactory):
    noisy = False

    def __init__(self, backend_port: int):
        self.backend_port = backend_port
        self.idle = []

    def buildProtocol(self, addr):
        return Client(self)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--alarm", type=int, default=3600, help="exit after this many seconds")
    args = parser.parse_args()
    signal.alarm(args.alarm)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    port = reactor.listenTCP(args.port, Relay(args.backend_port), interface="127.0.0.1")
    print(f"listening on 127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
