"""A local TensorFlow Serving: serves a SavedModel, or its LiteRT twin, over TF Serving's gRPC and REST APIs.

TF Serving ships only as an x86-64 Docker image, so it does not run natively on Apple Silicon nor
without Docker. This server speaks the same APIs on the same ports, so every TF Serving client (the
course notebook, the gateway, curl) works against it unchanged:

    python model_server.py --model_name=clothing-model --model_base_path=models/clothing-model

In Docker, Compose and Kubernetes the real `tensorflow/serving` image stays the model tier; this one is
for local runs, notebooks and tests. Like TF Serving it serves the highest integer version under the
base path, picks up a new one without a restart, batches requests when asked to, and drains in-flight
requests on SIGTERM. It does not do Classify, Regress or MultiInference, model config files, version
labels or several models at once.

Two runtimes, chosen by --runtime: `tensorflow` (the default) loads <version>/saved_model.pb as TF Serving does;
`litert` loads <version>/model.tflite (notebook 01 writes both) with LiteRT, and runs without TensorFlow installed:
a small image that is ready in under two seconds (docs/model-server.md says when to choose which).

This file is the command line and the wiring; the parts live in the `serving` package, one module each:
versions (the model on disk), batching, predict (a request's checks), tensors, grpc_api, rest_api, and the
runtimes (runtime_tensorflow, runtime_litert), of which only the chosen one is imported.
"""

from __future__ import annotations

import os

# TensorFlow's C++ start-up chatter would bury this server's own log lines; a value the user set wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import logging
import re
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from werkzeug.serving import make_server

from contract import GRPC_PORT, MODEL_BASE_PATH, MODEL_NAME, REST_PORT
from serving.batching import Batcher, BatchingOptions, parse_batching_parameters
from serving.errors import StartupError
from serving.grpc_api import SERVICE_NAMES, handlers
from serving.predict import Predictor
from serving.rest_api import RestApi
from serving.versions import ModelManager, Runtime

log = logging.getLogger("model_server")

ROOT = Path(__file__).resolve().parent
MIB = 1024 * 1024
# A batch of 32 images at 299x299x3 float32 is about 34 MB; TF Serving itself takes up to 2 GB.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MIB
# Predict requests held at once: several gateways' worth (each sends at most GATEWAY_MAX_INFLIGHT per worker).
DEFAULT_MAX_REQUESTS = 32
SPARE_GRPC_THREADS = 8


RUNTIMES = ("tensorflow", "litert")


def load_runtime(args: argparse.Namespace) -> Runtime:
    """The chosen runtime's module, imported only now: the LiteRT server never imports TensorFlow."""
    if args.runtime == "litert":
        from serving.runtime_litert import LiteRTRuntime

        return LiteRTRuntime(args.tensorflow_intra_op_parallelism)
    from serving.runtime_tensorflow import TensorFlowRuntime

    return TensorFlowRuntime(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism)


class ModelServer:
    """The model, the gRPC and REST servers, and their orderly start and stop."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        base_path = Path(args.model_base_path)
        runtime = load_runtime(args)
        if not base_path.is_dir():
            raise StartupError(
                f"Model base path {base_path} is not a directory. It should hold numbered versions for "
                f"{runtime.name} (<base>/1/{runtime.model_file}); for the course model run `make model` first, "
                "or pass --model_base_path."
            )
        self.health = health.HealthServicer()
        self.models = ModelManager(
            args.model_name, base_path, runtime, args.file_system_poll_wait_seconds, self._serving
        )
        self.batcher = None
        if args.enable_batching:
            options = BatchingOptions()
            if args.batching_parameters_file:
                try:
                    options = parse_batching_parameters(Path(args.batching_parameters_file).read_text())
                except (OSError, ValueError) as e:
                    raise StartupError(f"--batching_parameters_file {args.batching_parameters_file}: {e}") from e
            self.batcher = Batcher(options)
        self.predictor = Predictor(self.batcher, args.max_concurrent_requests)
        self.grpc_server = None
        self.rest_server = None
        self.rest_api = None

    def _serving(self) -> None:
        for service in ("", *SERVICE_NAMES):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> None:
        args = self.args
        self.models.poll()
        if self.models.current is None:
            self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            log.warning("No version of %s could be loaded yet: health is NOT_SERVING until one is", args.model_name)
        self.models.start_polling()
        if self.batcher is not None:
            self.batcher.start()
            log.info("Batching on: %s", self.batcher.options)

        limit = args.grpc_max_message_bytes
        # As many calls at once as there are threads: one more is refused at once (RESOURCE_EXHAUSTED) instead
        # of waiting unseen in the executor's queue until its deadline.
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=args.grpc_max_threads, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=args.grpc_max_threads,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Without this a second server on the same port starts silently and steals half the calls.
                ("grpc.so_reuseport", 0),
                *args.grpc_channel_arguments,
            ],
        )
        self.grpc_server.add_generic_rpc_handlers(handlers(self.models, self.predictor))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        try:
            port = self.grpc_server.add_insecure_port(f"{args.host}:{args.port}")
        except RuntimeError as e:
            raise StartupError(f"Cannot listen for gRPC on {args.host}:{args.port} (in use?): choose --port") from e
        self.grpc_server.start()
        log.info("gRPC on %s:%d (messages up to %d MiB)", args.host, port, limit // MIB)

        if args.rest_api_port:
            self.rest_api = RestApi(self.models, self.predictor, args.rest_api_max_request_bytes)
            try:
                self.rest_server = make_server(args.host, args.rest_api_port, self.rest_api, threaded=True)
            except OSError as e:
                raise StartupError(
                    f"Cannot listen for REST on {args.host}:{args.rest_api_port} ({e.strerror}): "
                    "choose --rest_api_port, or 0 to turn REST off"
                ) from e
            threading.Thread(target=self.rest_server.serve_forever, name="rest", daemon=True).start()
            log.info("REST on %s:%d", args.host, self.rest_server.server_port)

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish within `grace` seconds, then release everything."""
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        if self.batcher is not None:
            self.batcher.drain()
        stopped = self.grpc_server.stop(grace) if self.grpc_server else None
        if self.rest_server is not None:
            self.rest_server.shutdown()
            self.rest_server.server_close()
            if not self.rest_api.wait_idle(max(0.0, deadline - time.monotonic())):
                log.warning("REST requests still running after %.0f s: dropping them", grace)
        if stopped is not None:
            stopped.wait()
        if self.batcher is not None:
            self.batcher.close()
        self.models.stop()


def _flag_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """TF Serving's --grpc_channel_arguments: `name=value,name=value`, whole numbers as ints."""
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise argparse.ArgumentTypeError(f"expected name=value pairs separated by commas, not {item!r}")
        arguments.append((name, int(value) if re.fullmatch(r"-?\d+", value) else value))
    return arguments


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with flags spelled as tensorflow_model_server spells them; MODEL_NAME and MODEL_BASE_PATH
    as the tensorflow/serving image reads them (the base path there is $MODEL_BASE_PATH/$MODEL_NAME)."""
    parser = argparse.ArgumentParser(
        description="Serve a SavedModel or a LiteRT model over TF Serving's gRPC and REST APIs."
    )
    _serving_flags(parser)
    _limit_flags(parser)
    args = parser.parse_args(argv)
    if args.model_base_path is None:
        env_base = os.environ.get("MODEL_BASE_PATH")
        args.model_base_path = os.path.join(env_base, args.model_name) if env_base else str(ROOT / MODEL_BASE_PATH)
    if args.grpc_max_threads is None:
        args.grpc_max_threads = max(args.max_concurrent_requests, 16) + SPARE_GRPC_THREADS
    for name in ("tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 (TensorFlow's choice) or more")
    if args.batching_parameters_file and not args.enable_batching:
        parser.error("--batching_parameters_file needs --enable_batching")
    return args


def _serving_flags(parser: argparse.ArgumentParser) -> None:
    """What is served, where, and how: ports, the model, batching, version polling."""
    parser.add_argument("--port", type=int, default=GRPC_PORT, help="gRPC port; 0 picks a free one (%(default)s)")
    parser.add_argument(
        "--rest_api_port", type=int, default=REST_PORT, help="REST port; 0 turns REST off (%(default)s)"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (%(default)s)")  # noqa: S104 - as TF Serving
    parser.add_argument(
        "--model_name",
        default=os.environ.get("MODEL_NAME", MODEL_NAME),
        help="the name clients ask for ($MODEL_NAME, else %(default)s)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=os.environ.get("MODEL_RUNTIME", "tensorflow"),
        help="what runs the model: tensorflow (<version>/saved_model.pb, as TF Serving) or litert "
        "(<version>/model.tflite, without TensorFlow) ($MODEL_RUNTIME, else %(default)s)",
    )
    parser.add_argument(
        "--model_base_path",
        help=f"directory of numbered model versions ($MODEL_BASE_PATH/<model name>, else {MODEL_BASE_PATH} "
        "in this repository)",
    )
    parser.add_argument(
        "--enable_batching",
        type=_flag_bool,
        nargs="?",
        const=True,
        default=False,
        help="merge concurrent requests into one model call",
    )
    parser.add_argument(
        "--batching_parameters_file",
        help="TF Serving's BatchingParameters in protobuf text format (see dockerfiles/batching.config)",
    )
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1.0,
        help="seconds between looks for a new version; 0 looks once, at start-up (%(default)s)",
    )


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    """How much the server takes on: requests and threads, message sizes, TensorFlow's threads, stopping, logs."""
    parser.add_argument(
        "--max_concurrent_requests",
        type=int,
        default=DEFAULT_MAX_REQUESTS,
        help="Predict requests held at once, running or waiting for the model; one more is answered UNAVAILABLE "
        "at once; 0: no limit (%(default)s)",
    )
    parser.add_argument(
        "--grpc_max_threads",
        type=int,
        help="gRPC calls served at once; more are refused with RESOURCE_EXHAUSTED "
        f"(default: --max_concurrent_requests + {SPARE_GRPC_THREADS}, for status, metadata and health calls)",
    )
    parser.add_argument(
        "--grpc_max_message_bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message received or sent (%(default)s)",
    )
    parser.add_argument(
        "--grpc_channel_arguments",
        type=_channel_arguments,
        default=[],
        help="gRPC server arguments as TF Serving takes them, e.g. grpc.max_connection_age_ms=60000 (comma-separated)",
    )
    parser.add_argument(
        "--tensorflow_intra_op_parallelism",
        type=int,
        default=0,
        help="threads that one operation of the model may use (with litert: that one call may use); 0: the runtime's "
        "choice, about one per core. With several requests at once, 1 can serve more of them (docs/model-server.md) "
        "(%(default)s)",
    )
    parser.add_argument(
        "--tensorflow_inter_op_parallelism",
        type=int,
        default=0,
        help="threads for independent operations at once; 0: TensorFlow's choice; litert has none (%(default)s)",
    )
    parser.add_argument(
        "--rest_api_max_request_bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest REST request body; larger ones get 413 (%(default)s)",
    )
    parser.add_argument(
        "--grace_period_seconds",
        type=float,
        default=10.0,
        help="on SIGTERM or SIGINT, how long in-flight requests may still take (%(default)s)",
    )
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # it logs every request at INFO

    # Handlers first, so a SIGTERM during the model load still ends in an orderly stop.
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            # Ctrl-C twice means "now"; a repeated SIGTERM changes nothing.
            if signum == signal.SIGINT:
                log.warning("Second SIGINT: exiting without waiting for requests")
                os._exit(1)
            return
        grace = args.grace_period_seconds
        log.info("%s: stopping (in-flight requests get up to %.0f s)", signal.Signals(signum).name, grace)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    try:
        server = ModelServer(args)
        server.start()
    except StartupError as e:
        log.error("%s", e)
        if server is not None:
            server.stop(0)
        return 1
    # A timed wait keeps the main thread responsive to signals.
    while not stop.wait(1.0):
        pass
    server.stop(args.grace_period_seconds)
    log.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
