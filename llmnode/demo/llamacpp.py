"""
Serve a GGUF model with llama.cpp's own HTTP server, from the xllamacpp wheel.

A stand-in for a C{llama-server} binary where only PyPI is available::

    python -m llmnode.demo.llamacpp --model tiny.gguf --port 10001 --threads 1

C{xllamacpp.Server} loads the model, then starts llama.cpp's HTTP server
(C{/health}, C{/v1/models}, C{/v1/chat/completions}, C{/v1/completions},
C{/v1/embeddings}, ...) on its own threads; this script only configures it,
reports where it listens, and waits for SIGTERM, SIGINT or its alarm
(before the model is loaded, those end the process at once).
"""

import argparse
import os
import signal
import sys
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """
    Parse the command line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m llmnode.demo.llamacpp",
        description="Serve a GGUF model over llama.cpp's OpenAI HTTP API.")
    parser.add_argument("--model", required=True, help="GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="llama.cpp compute threads (default 1)")
    parser.add_argument(
        "--ctx", type=int, default=256, help="context size in tokens")
    parser.add_argument(
        "--parallel", type=int, default=1, help="concurrent sequences")
    parser.add_argument(
        "--embedding", action="store_true",
        help="enable /v1/embeddings (mean pooling)")
    parser.add_argument(
        "--alias", default=None, help="model name reported by the API")
    parser.add_argument(
        "--alarm", type=int, default=3600,
        help="exit after this many seconds whatever happens (0: never)")
    return parser.parse_args(argv)


def build_params(xllamacpp: Any, options: argparse.Namespace) -> Any:
    """
    Translate C{options} into an C{xllamacpp.CommonParams}.
    """
    params = xllamacpp.CommonParams()
    params.model.path = options.model
    params.hostnames = [options.host]
    params.port = options.port
    params.n_ctx = options.ctx
    params.n_parallel = options.parallel
    params.cpuparams.n_threads = options.threads
    params.cpuparams_batch.n_threads = options.threads
    if options.alias:
        params.model_alias = {options.alias}
    if options.embedding:
        params.embedding = True
        params.pooling_type = (
            xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN)
    return params


def _catch_stop_signals() -> int:
    """
    Route the stop signals, whichever thread receives them, to a pipe.

    @return: the pipe's read end; each signal writes its number there.
    """
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer)
    for number in _STOP_SIGNALS:
        signal.signal(number, lambda number, frame: None)
    return reader


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run the server until a stop signal; return the exit status.
    """
    options = parse_args(sys.argv[1:] if argv is None else argv)
    # Loading holds the GIL, so until the server is up a stop signal takes
    # its default action and ends the process at once.
    for number in _STOP_SIGNALS:
        signal.signal(number, signal.SIG_DFL)
    if options.alarm > 0:
        signal.alarm(options.alarm)
    try:
        import xllamacpp
    except ImportError as e:
        print("llamacpp: cannot import xllamacpp: %s" % (e,), file=sys.stderr)
        return 2
    if not os.path.isfile(options.model):
        print("llamacpp: no model file at %s" % (options.model,),
              file=sys.stderr)
        return 2
    try:
        server = xllamacpp.Server(build_params(xllamacpp, options))
    except Exception as e:
        print("llamacpp: server did not start: %s" % (e,), file=sys.stderr)
        return 1
    stops = _catch_stop_signals()
    address = urlsplit(server.listening_address)
    print("listening on %s:%d pid %d" % (address.hostname, address.port,
                                         os.getpid()), flush=True)
    received = os.read(stops, 1)[0]
    print("llamacpp: %s, stopping" % (signal.Signals(received).name,),
          file=sys.stderr, flush=True)
    # Exit without tearing the server down: llama.cpp's shutdown joins its HTTP and worker
    # threads, and on a loaded machine that join was seen to hang past the node's stop
    # timeout. The kernel frees the model's memory and the port either way.
    sys.stdout.flush()
    os._exit(0 if received != signal.SIGALRM else 3)


if __name__ == "__main__":
    sys.exit(main())
