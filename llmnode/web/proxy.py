"""The OpenAI-compatible C{/v1} routing proxy.

A POST names a model in its JSON body; the proxy resolves it (id or alias), checks that the
model's mode serves the endpoint, starts it on demand, forwards the request and streams the
answer back through L{StreamRelay}.

Mounting (see L{mount})::

    v1 = V1Resource(node, backends, clock, program)
    root.putChild(b"v1", v1)
    root.putChild(b"rerank", v1.rerank)
    NodeSite(root, max_body_bytes=max_body_bytes(program.max_body_mb))
    ...
    v1.close()  # when the node stops: the backend header timeout's timer ends

twisted.web's own server serves it too (L{llmnode.web.request.TwistedSite}); the limit still
holds there (413), but twisted.web will have buffered the whole oversized body before the proxy
sees it. Any C{treq.HTTPClient} can stand for the node's client
(L{llmnode.web.backend_http.TreqBackends}).

A request's way, from C{/v1/...} to the backend and back: L{ProxyEndpoint.render} ->
L{Forwarder.handle} (route by the body's C{model}) -> L{Forwarder.forward} -> L{Exchange}
(wait for the scheduler, send through L{BackendHTTP}) -> L{StreamRelay} (the answer, as it
arrives).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, cast

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError as BackendRefused
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.internet.interfaces import (IDelayedCall, IPushProducer, IReactorFromThreads,
                                         IReactorTime, ITransport)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from llmnode.config import ENDPOINTS
from llmnode.lifecycle import RUNNING
from llmnode.node import ModelRuntime, Ticket
from llmnode.errors import BadGateway, BadRequest, GatewayTimeout, ModelNotFound, NodeError
from llmnode.web.client import backend_url
from llmnode.web.body import max_body_bytes, parse_json_object, read_body
from llmnode.web.responses import ErrorResource, method_not_allowed, PendingResponse, render_error
from llmnode.web.routing import full_routing, quick_routing, read_large_body, Routing, with_model
from llmnode.web.models import ModelsResource
from llmnode.web.multipart import boundary_of, form_fields, form_text, leading_fields
from llmnode.web.relay import StreamRelay, forwarded_headers
from llmnode.web.upload import HOLD_LIMIT, BodyStream
from llmnode.web.backend_http import read_answer
from llmnode.web.server import JOIN_ABOVE

if TYPE_CHECKING:
    from llmnode.config import Model, Program
    from llmnode.node import Node
    from llmnode.web.backend_http import BackendAnswer, BackendHTTP
    from llmnode.web.multipart import Fields
    from llmnode.web.request import WebRequest

T = TypeVar("T")

log = Logger()

#: Request headers never forwarded: the agent sets its own Host and Content-Length, and the
#: node already answered any C{Expect: 100-continue}.
_REQUEST_DROP = frozenset({b"host", b"content-length", b"expect"})

#: What routing a request gives: its runtime, the body to send and whether it streams.
Routed = tuple[ModelRuntime, Any, bool]


class _Branch(Resource):
    """A path prefix: itself and any unknown child answer a JSON 404."""

    def getChild(self, path: bytes, request: WebRequest) -> Resource:
        return ErrorResource()

    def render(self, request: WebRequest) -> bytes:
        return ErrorResource().render(request)


class V1Resource(_Branch):
    """C{/v1}: the proxied endpoints and the model listing.

    @param node: resolves names to runtimes (C{lookup}, C{runtimes}).
    @param backends: how requests reach the backends (the node's L{BackendClient}, pooled).
    @param clock: C{callLater}/C{seconds} provider.
    @param program: the L{llmnode.config.Program} settings (body limit, timeouts).
    """

    def __init__(self, node: Node, backends: BackendHTTP, clock: IReactorTime,
                 program: Program) -> None:
        super().__init__()
        forwarder = Forwarder(node, backends, clock, program)
        self.chat = ProxyEndpoint(forwarder, "chat")
        self.completions = ProxyEndpoint(forwarder, "completions")
        self.embeddings = ProxyEndpoint(forwarder, "embeddings")
        self.rerank = ProxyEndpoint(forwarder, "rerank")
        self.models = ModelsResource(node, created=int(clock.seconds()))
        self.putChild(b"chat", _branch({b"completions": self.chat}))
        self.putChild(b"completions", self.completions)
        self.putChild(b"embeddings", self.embeddings)
        self.putChild(b"rerank", self.rerank)
        self.putChild(b"reranking", self.rerank)
        self.putChild(b"models", self.models)
        self.putChild(b"responses", ProxyEndpoint(forwarder, "responses"))
        messages = ProxyEndpoint(forwarder, "messages")
        messages.putChild(b"count_tokens", ProxyEndpoint(forwarder, "messages"))
        self.putChild(b"messages", messages)
        self.putChild(b"audio", _branch({
            b"transcriptions": ProxyEndpoint(forwarder, "transcriptions", form=True),
            b"translations": ProxyEndpoint(forwarder, "translations", form=True),
            b"speech": ProxyEndpoint(forwarder, "speech"),
        }))
        self.putChild(b"images", _branch({
            b"generations": ProxyEndpoint(forwarder, "image_generations"),
            b"edits": ProxyEndpoint(forwarder, "image_edits", form=True),
        }))
        #: llama.cpp's own routes, mounted at the root by L{mount}.
        self.native = {
            b"completion": ProxyEndpoint(forwarder, "completion"),
            b"infill": ProxyEndpoint(forwarder, "infill"),
            b"tokenize": ProxyEndpoint(forwarder, "tokenize"),
            b"detokenize": ProxyEndpoint(forwarder, "tokenize"),
        }
        self.forwarder = self._forwarder = forwarder

    def close(self) -> None:
        """Stop the proxy's timer (the backend header timeout's)."""
        self._forwarder.close()


def _branch(children: dict[bytes, Resource]) -> _Branch:
    branch = _Branch()
    for name, child in children.items():
        branch.putChild(name, child)
    return branch


def mount(root: Resource, node: Node, backends: BackendHTTP, clock: IReactorTime,
          program: Program) -> V1Resource:
    """Put the proxy at C{/v1}, its rerank endpoint at C{/rerank} and llama.cpp's native
    routes (C{/completion}, C{/infill}, C{/tokenize}, C{/detokenize}) under C{root}."""
    v1 = V1Resource(node, backends, clock, program)
    root.putChild(b"v1", v1)
    root.putChild(b"rerank", v1.rerank)
    for name, endpoint in v1.native.items():
        root.putChild(name, endpoint)
    return v1


class ProxyEndpoint(Resource):
    """One POST endpoint that forwards to the model named in the body: a JSON body, or with
    C{form} a C{multipart/form-data} one (an upload) naming it in a form field.

    Children put on it (C{/v1/messages/count_tokens}) are reached through it; any other path
    below it is a 404.
    """

    isLeaf = True

    def __init__(self, forwarder: "Forwarder", endpoint: str, form: bool = False) -> None:
        super().__init__()
        self._forwarder = forwarder
        self._endpoint = endpoint
        self._form = form
        #: A large upload reaches it as it arrives (L{Forwarder.handle}).
        self.streams_uploads = form

    def putChild(self, path: bytes, child: IResource) -> None:
        self.isLeaf = False
        super().putChild(path, child)

    def getChild(self, path: bytes, request: WebRequest) -> Resource:
        if path == b"":
            return self
        return ErrorResource()

    def render(self, request: WebRequest) -> bytes | int:
        if request.postpath not in ([], [b""]):
            return ErrorResource().render(request)
        if request.method != b"POST":
            return method_not_allowed(request, ("POST",))
        try:
            self._forwarder.handle(request, self._endpoint, self._form)
        except NodeError as e:
            return render_error(request, e)
        except Exception:
            log.failure("routing a {endpoint} request failed", endpoint=self._endpoint)
            return render_error(request, NodeError("internal error in the proxy"))
        return NOT_DONE_YET


class Forwarder:
    """Resolves and forwards proxied requests; shared by the endpoints."""

    def __init__(self, node: Node, backends: BackendHTTP, clock: IReactorTime,
                 program: Program) -> None:
        self._node = node
        self._backends = backends
        self._clock = clock
        self._program = program
        self._limit = max_body_bytes(program.max_body_mb)
        self._watch = HeaderWatch(clock, program.backend_header_timeout)

    @property
    def limit(self) -> int:
        """The largest request body forwarded, in bytes."""
        return self._limit

    def close(self) -> None:
        self._watch.stop()

    def handle(self, request: WebRequest, endpoint: str, form: bool = False) -> None:
        """Route C{request} by the model its body names and forward it: the one way in from
        an endpoint to a backend.

        The body is a JSON object, or with C{form} a C{multipart/form-data} upload naming the
        model in a form field. Whatever grows with the body's size (joining a large body,
        scanning one whose routing members L{quick_routing} cannot find cheaply, editing a
        large one) runs in a worker thread, and forwarding goes on from there; the reactor
        answers other requests meanwhile. A L{NodeError} raised here is the client's answer;
        one found later is sent by L{_later}.
        """
        if not request.uri.isascii():
            raise BadRequest("the request target must be ASCII (percent-encode it)")
        if form:
            self._handle_form(request, endpoint)
            return
        parts = request.body_parts
        if parts is not None:
            reading = self._in_thread(read_large_body, parts)
            self._later(request, reading, self._joined, request, endpoint)
            return
        raw = read_body(request, self._limit)
        routing = quick_routing(raw)
        if routing is None:
            self._later(request, self._in_thread(full_routing, raw), self._routed, request, raw,
                        endpoint)
            return
        self._routed(routing, request, raw, endpoint)

    def _later(self, request: WebRequest, work: Deferred[T],
               then: Callable[..., None], *args: Any) -> None:
        """Go on with C{then(result, *args)} once C{work} (in a worker thread) is done, unless
        the client left meanwhile; answer the error if it or C{then} fails."""
        pending = PendingResponse(request)

        def go_on(result: T) -> None:
            if pending.open:
                then(result, *args)

        def failed(failure: Failure) -> None:
            if not failure.check(NodeError):
                log.failure("routing a {path} request failed", failure,
                            path=request.path.decode("ascii", "replace")[:200])
                failure = Failure(NodeError("internal error in the proxy"))
            pending.send_error(cast(NodeError, failure.value))

        work.addCallback(go_on).addErrback(failed)

    def _joined(self, read: tuple[bytes, Routing], request: WebRequest, endpoint: str) -> None:
        """A large body was joined and read in a worker thread: route it."""
        raw, routing = read
        request.body_joined(raw)
        self._routed(routing, request, raw, endpoint)

    def _in_thread(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run C{function} in the reactor's thread pool (inline under a test's Clock)."""
        pool = getattr(self._clock, "getThreadPool", None)
        if pool is None:
            return maybeDeferred(function, *args)
        return deferToThreadPool(cast("IReactorFromThreads", self._clock), pool(), function,
                                 *args)

    def _routed(self, routing: Routing, request: WebRequest, raw: bytes,
                endpoint: str) -> None:
        """The body's routing members are known: edit the body as the model asks, forward."""
        fields = routing.members
        name = fields.get("model")
        if "model" not in fields:
            raise BadRequest("missing required parameter 'model'", param="model")
        if not isinstance(name, str):
            raise BadRequest("'model' must be a string", param="model")
        runtime = self.runtime_for(name, endpoint)
        model = runtime.model
        streaming = fields.get("stream") is True
        if model.edits_body:
            if len(raw) > JOIN_ABOVE:
                self._later(request, self._in_thread(_edited, raw, routing, model),
                            self._edited, request, runtime, streaming, endpoint)
                return
            raw = _edited(raw, routing, model)
        self.forward(request, runtime, raw, streaming, endpoint)

    def _edited(self, raw: bytes, request: WebRequest, runtime: ModelRuntime, streaming: bool,
                endpoint: str) -> None:
        self.forward(request, runtime, raw, streaming, endpoint)

    def _handle_form(self, request: WebRequest, endpoint: str) -> None:
        """L{handle} for a C{multipart/form-data} body: the model is its C{model} field.

        Parameter filters do not apply to forms; C{upstream_model} does.
        """
        boundary = boundary_of(request.getHeader(b"Content-Type"))
        body = request.body_stream
        if body is not None:
            self._later(request, self._route_streamed(body, boundary, endpoint),
                        self._form_routed, request, endpoint)
            return
        raw = read_body(request, self._limit)
        routed = self._route_form(raw, form_fields(raw, boundary, _FORM_ROUTING), endpoint)
        self._form_routed(routed, request, endpoint)

    def _form_routed(self, routed: Routed, request: WebRequest, endpoint: str) -> None:
        self.forward(request, *routed, endpoint)

    def _route_form(self, raw: bytes, fields: Fields, endpoint: str) -> Routed:
        """The runtime, body and streaming of a form whose routing fields are known."""
        if b"model" not in fields:
            raise BadRequest("missing required form field 'model'", param="model")
        runtime = self.runtime_for(form_text(raw, fields[b"model"]), endpoint)
        upstream = runtime.model.upstream_model
        if upstream is not None:
            start, end = fields[b"model"]
            raw = raw[:start] + upstream.encode("utf-8") + raw[end:]
        stream = fields.get(b"stream")
        return runtime, raw, stream is not None and form_text(raw, stream) == "true"

    def _route_streamed(self, body: BodyStream, boundary: bytes,
                        endpoint: str) -> Deferred[Routed]:
        """Route an upload still arriving: once the beginning that holds its C{model} field
        is here, fire with the runtime and the body (a producer that sends what is held, then
        the rest as it arrives). A form whose model comes only after a large file is held
        whole first."""
        routed: Deferred[Routed] = Deferred()

        def look() -> None:
            if routed.called:
                return
            if body.failure is not None:
                body.watch(None)
                routed.errback(NodeError("the client left before its upload was routed"))
                return
            held = body.held()
            try:
                if body.complete:
                    fields = form_fields(held, boundary, _FORM_ROUTING)
                else:
                    fields = (leading_fields(held, boundary, _FORM_ROUTING)
                              if len(held) <= _SCAN_HELD_UP_TO else {})
                    if b"model" not in fields:
                        return
                runtime, edited, streaming = self._route_form(held, fields, endpoint)
            except Exception:
                body.watch(None)
                routed.errback()
                return
            body.watch(None)
            if edited is not held:
                body.replace_held(edited)
            body.hold_at_most(HOLD_LIMIT)
            routed.callback((runtime, body, streaming))

        body.watch(look)
        look()
        return routed

    def runtime_for(self, name: str, endpoint: str) -> ModelRuntime:
        """The runtime of the model called C{name}, if it serves C{endpoint}; else a
        L{NodeError} (404 unknown, 400 wrong mode)."""
        runtime = self._node.lookup(name)
        if runtime is None:
            raise ModelNotFound(f"the model {name[:200]!r} does not exist on this node",
                                param="model")
        model = runtime.model
        if not model.serves(endpoint):
            served = "its endpoints list" if model.endpoints is not None else (
                f"mode {model.mode!r}")
            raise BadRequest(
                f"model {name[:200]!r} has {served} and does not serve "
                f"{ENDPOINTS[endpoint]}", param="model", code="wrong_model_mode")
        return runtime

    def forward(self, request: WebRequest, runtime: ModelRuntime, body: bytes | BodyStream,
                streaming: bool = False,
                endpoint: Optional[str] = None, target: Optional[bytes] = None) -> None:
        """Start forwarding the request (the scheduler counts it until its response ends).

        @param body: the bytes to send, or a L{BodyStream} (an upload still arriving).

        @param streaming: the client asked for a stream; while it waits for a cold start it
            gets SSE comments, so that it and any proxy in between keep the connection open.
        @param target: the path (and query) to request from the backend; default the
            client's.
        """
        Exchange(request, runtime, body, self._backends, self._clock, self._program, self._watch,
                 endpoint, streaming, target).start()


def _edited(raw: bytes, routing: Routing, model: Model) -> bytes:
    """The body C{model}'s backend gets: only the model renamed (spliced in place, no
    decoding) when that is the only edit, else decoded, edited and encoded again."""
    if not (model.strip_params or model.set_params or model.default_params):
        return with_model(raw, routing, cast(str, model.upstream_model))  # the only edit
    return json.dumps(model.edit_body(parse_json_object(raw))).encode("utf-8")


#: The form fields L{Forwarder._route_form} reads.
_FORM_ROUTING = frozenset({b"model", b"stream"})

#: The beginning of a streamed upload is searched for its routing fields while it is at most
#: this long; beyond, the upload is held whole first.
_SCAN_HELD_UP_TO = 1024 * 1024


class Exchange:
    """One proxied request, along one path from the client to the backend and back::

        start ──(running, with room)──────────────► _send ─► _answered ─► _deliver (relay)
          └──(else)──► _wait (queued) ─► _let_through ─┘  ▲     │
                         ▲                                 │     └─(refused)─► _after_refused
                         └───────────── _requeue ◄─────────┴─────────────────────┘

    A request for a model that is running with room goes at once (L{ModelRuntime.try_admit});
    any other waits in its model's queue for a L{Ticket} to fire. A backend that refuses the
    connection died a moment ago: once the node notices, the request waits its turn again,
    once. Either way the runtime hears exactly once how it ended:
    L{ModelRuntime.request_finished} if it was let through, L{ModelRuntime.request_abandoned}
    if not. A client that leaves cancels the step under way (L{_work}).
    """

    def __init__(self, request: WebRequest, runtime: ModelRuntime, body: bytes | BodyStream,
                 backends: BackendHTTP, clock: IReactorTime, program: Program,
                 watch: "HeaderWatch", endpoint: Optional[str] = None, streaming: bool = False,
                 target: Optional[bytes] = None) -> None:
        self._watch = watch
        self._target = target
        self._runtime = runtime
        self._body = body
        self._backends = backends
        self._clock = clock
        self._program = program
        self._headers_late = False
        self._sending = False
        self._refused = False
        self._work: Optional[Deferred[Any]] = None
        self._admitted = False
        self._ticket: Optional[Ticket] = None
        self.streaming = streaming
        self.endpoint = endpoint
        self._loading: Optional[LoadingComments] = None
        self._pending = PendingResponse(request, on_gone=self._client_gone, on_end=self._ended)

    def start(self) -> None:
        runtime = self._runtime
        if runtime.try_admit():
            # The common case: the model is up and has a free slot.
            self._admitted = True
            self._send(*runtime.address)
        else:
            self._wait(runtime.enqueue())

    def _wait(self, ticket: Ticket) -> None:
        """Wait until the scheduler lets the request through; streaming clients hear what it
        waits for meanwhile."""
        self._ticket = ticket
        ready = self._work = ticket.ready
        if self.streaming and not ready.called and self._loading is None:
            runtime = self._runtime
            self._loading = LoadingComments(self._pending, self._clock, runtime.model.id,
                                            runtime.wait_reason)
        ready.addCallbacks(self._let_through, self._fail,
                           callbackArgs=(ticket,)).addErrback(self._crashed)

    def _let_through(self, address: tuple[str, int], ticket: Ticket) -> None:
        self._admitted = ticket.forwarded
        self._ticket = None
        self._send(*address)

    def _send(self, host: str, port: int) -> None:
        """Send the request; L{_answered} hears the backend's answer once its headers arrived
        (within C{backend_header_timeout}), or why there is none."""
        self._sending = True
        request = self._pending.request
        target = self._target
        if target is None:
            target = request.uri if request.uri.startswith(b"/") else request.path
        sending = self._work = self._backends.send(
            request.method, backend_url(host, port, target),
            forwarded_headers(request, _REQUEST_DROP), self._body)
        if not sending.called:
            self._watch.watch(sending, self._too_late)
        sending.addBoth(self._answered, sending)

    def _too_late(self, sending: Deferred[BackendAnswer]) -> None:
        self._headers_late = True
        sending.cancel()

    def _answered(self, result: BackendAnswer | Failure,
                  sending: Deferred[BackendAnswer]) -> None:
        self._watch.unwatch(sending)
        try:
            if not isinstance(result, Failure):
                self._deliver(result)
            elif result.check(BackendRefused) and not self._refused:
                self._refused = True
                self._after_refused()
            else:
                self._fail(result)
        except Exception:
            self._crashed(Failure())

    def _after_refused(self) -> None:
        """The backend refused the connection: it died a moment ago and the node has not
        seen its exit yet. Nothing of this request reached it: once the crash is noticed,
        wait for the restarted backend and try again."""
        noticed = self._work = self._backend_noticed_gone()
        noticed.addCallbacks(self._requeue, self._fail).addErrback(self._crashed)

    def _requeue(self, noticed: bool) -> None:
        if not noticed:
            self._fail(Failure(BackendRefused()))
            return
        self._admitted = False
        self._wait(self._runtime.requeue())

    def _backend_noticed_gone(self, patience: float = 1.0) -> Deferred[bool]:
        """Fires with whether the model left the running state within C{patience} seconds."""
        lifecycle = self._runtime.lifecycle
        if lifecycle.state != RUNNING:
            return succeed(True)

        def in_time(failure: Failure) -> bool:
            failure.trap(TimeoutError)
            return False

        moved = lifecycle.changed()
        moved.addTimeout(patience, self._clock)
        return moved.addCallbacks(lambda _: True, in_time)

    def _deliver(self, response: BackendAnswer) -> None:
        if not self._pending.open:
            response.deliverBody(_Discard())
            return
        headers_sent = self._loading is not None and self._loading.stop()
        if headers_sent and response.code != 200:
            cast(LoadingComments, self._loading).relay_error(response)
            return
        StreamRelay(self._pending, self._clock, self._program.stream_idle_timeout).start(
            response, headers_sent=headers_sent)

    def _fail(self, failure: Failure) -> None:
        """Answer why the request cannot be forwarded (nothing if the client left)."""
        if not self._pending.open:
            return
        error = self._as_node_error(failure)
        if self._loading is not None and self._loading.stop():
            self._loading.send_error(error)
        else:
            self._pending.send_error(error)

    def _ended(self, result: Optional[Failure]) -> None:
        """The response ended (C{result} None) or the client left first: tell the runtime."""
        runtime = self._runtime
        status = self._pending.request.code if result is None else 499
        try:
            if self._admitted:
                self._admitted = False
                runtime.request_finished(self.endpoint, status)
            else:
                runtime.request_abandoned(self._ticket, self.endpoint, status)
        except Exception:
            log.failure("ending a request to {model} failed", model=runtime.model.id)

    def _crashed(self, failure: Failure) -> None:
        log.failure("proxying a request to {model} failed", failure,
                    model=self._runtime.model.id)
        pending = self._pending
        if pending.open:
            if pending.request.startedWriting:
                pending.cut()
            else:
                pending.send_error(NodeError("internal error in the proxy"))

    def _client_gone(self) -> None:
        if self._work is not None:
            self._work.cancel()

    def _as_node_error(self, failure: Failure) -> NodeError:
        model = self._runtime.model.id
        error = failure.value
        if isinstance(error, NodeError):
            return error
        if self._headers_late:
            return GatewayTimeout(
                f"model {model!r} sent no response headers within "
                f"{self._program.backend_header_timeout:g} s")
        if not self._sending:
            log.failure("starting model {model} failed unexpectedly", failure, model=model)
            return NodeError(f"starting model {model!r} failed: {_describe(error)}")
        log.info("backend of {model} failed: {why}", model=model, why=_describe(error))
        return BadGateway(f"the backend of model {model!r} failed: {_describe(error)}")


def _describe(error: Optional[BaseException]) -> str:
    """A short reason; unwraps twisted.web's C{reasons} lists of Failures."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = getattr(reasons[0], "value", reasons[0])
    text = str(error) or type(error).__name__
    return text[:300]


class HeaderWatch:
    """The backend header timeout of every request on its way, on one timer.

    A request is watched from when it is sent until its response headers arrive (or it
    fails). The timer checks every quarter of the timeout (at most every second), so a request
    is given up between one and one and a quarter timeouts after it was sent: one timer for all
    requests instead of one per request. The timer is not cancelled when the last request is
    unwatched: it runs out and, finding nothing watched, is not set again, so it outlives the
    traffic by one tick at most. (At one request at a time, a timer made and cancelled for
    every request cost 5 % of the node's instructions per request: the reactor keeps its
    timers in a heap ordered by Python comparisons, and rebuilds it after cancellations.)
    L{stop} ends it for good.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._tick = min(1.0, timeout / 4)
        self._watched: dict[Deferred[BackendAnswer],
                            tuple[float, Callable[[Deferred[BackendAnswer]], object]]] = {}
        self._timer: Optional[IDelayedCall] = None
        self._stopped = False

    def watch(self, sending: Deferred[BackendAnswer],
              on_late: Callable[[Deferred[BackendAnswer]], object]) -> None:
        """Call C{on_late(sending)} if C{sending} is still watched after the timeout."""
        self._watched[sending] = (self._clock.seconds() + self._timeout, on_late)
        if self._timer is None and not self._stopped:
            self._timer = self._clock.callLater(self._tick, self._check)

    def unwatch(self, sending: Deferred[BackendAnswer]) -> None:
        """Stop watching C{sending}."""
        self._watched.pop(sending, None)

    def stop(self) -> None:
        """Cancel the timer and set none again (the node is stopping)."""
        self._stopped = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        late = [(sending, on_late) for sending, (deadline, on_late) in self._watched.items()
                if deadline <= now]
        for sending, on_late in late:
            self._watched.pop(sending, None)
            try:
                on_late(sending)
            except Exception:
                log.failure("giving up on a late backend failed")
        if self._watched and self._timer is None and not self._stopped:
            self._timer = self._clock.callLater(self._tick, self._check)


class _Discard(Protocol):
    """A body protocol that closes a response nobody wants any more."""

    def makeConnection(self, transport: ITransport) -> None:
        cast(IPushProducer, transport).stopProducing()


class LoadingComments:
    """While a streaming request waits for its turn, send SSE comment lines saying what it waits
    for (C{: waiting 3 s: sa finishing 3 requests, then loading sb, ~1 s}) every second, so that
    clients and proxies in between don't time out. Nothing is sent if the request goes through
    within the first second.

    @param describe: returns what the request waits for, in words.
    """

    interval = 1.0

    def __init__(self, pending: PendingResponse, clock: IReactorTime, model_id: str,
                 describe: Callable[[], str]) -> None:
        self._pending = pending
        self._clock = clock
        self._model_id = model_id
        self._describe = describe
        self._began = clock.seconds()
        self.headers_sent = False
        self._timer: Optional[IDelayedCall] = clock.callLater(self.interval, self._tick)
        pending.on_gone(self.stop)

    def _tick(self) -> None:
        self._timer = None
        if not self._pending.open:
            return
        request = self._pending.request
        if not self.headers_sent:
            self.headers_sent = True
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.setHeader(b"Cache-Control", b"no-cache")
            request.setHeader(b"X-Accel-Buffering", b"no")
        waited = self._clock.seconds() - self._began
        what = " ".join(self._describe().split())[:300]
        request.write(f": waiting {waited:.0f} s: {what}\n\n".encode("utf-8"))
        self._timer = self._clock.callLater(self.interval, self._tick)

    def stop(self) -> bool:
        """Stop the comments; whether the response headers were already sent."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.headers_sent

    def send_error(self, error: NodeError) -> None:
        """End the already-started stream with an OpenAI-style error event."""
        if self._pending.open:
            self._pending.request.write(b"data: " + error.body() + b"\n\n")
            self._pending.finish()

    def relay_error(self, response: BackendAnswer) -> None:
        """The backend answered an error after the stream began: pass it on as an event."""
        d = read_answer(response)
        d.addCallback(lambda body: self.send_error(BadGateway(
            f"the backend of model {self._model_id!r} answered {response.code}: "
            f"{body[:2000].decode('utf-8', 'replace')}")))
        d.addErrback(lambda f: self._pending.cut())
