"""The floor of a Python gRPC server: TF Serving's Predict method that takes the request's bytes and answers a
fixed PredictResponse, without parsing the request and without a model, after holding the call as long as the
model would take.

    python bench/bare_grpc_server.py --port 8600 --mode sync    # grpc.server and a thread pool, as model_server.py
    python bench/bare_grpc_server.py --port 8600 --mode asyncio # grpc.aio.server, the handler in the event loop
    python bench/bare_grpc_server.py --port 8600 --hold-ms 3.2  # busy for 3.2 ms per call, as a model keeps a core

bench_model_server.py sends it the same requests as model_server.py, interleaved with them: what a call costs
beyond its hold is what grpcio itself costs for those bytes on this machine (HTTP/2, the loopback, the server's
threads or event loop, waking up after the wait), which no servicer written in Python can go below.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from concurrent import futures

import common  # noqa: F401 - puts the repository on sys.path
import grpc
import numpy as np

import protobuf
from contract import MODEL_NAME, OUTPUT_NAME

SERVICE, METHOD = protobuf.PREDICT_METHOD.strip("/").split("/")


def fixed_answer() -> bytes:
    """A PredictResponse as model_server.py gives it for one image: ten float_val logits, shape [1, 10]."""
    response = protobuf.PredictResponse()
    response.model_spec.name = MODEL_NAME
    response.model_spec.version.value = 1
    logits = response.outputs[OUTPUT_NAME]
    logits.dtype = protobuf.DT_FLOAT
    logits.tensor_shape.dim.extend(protobuf.TensorShapeProto.Dim(size=size) for size in (1, 10))
    logits.float_val.extend(np.linspace(-5, 5, 10).tolist())
    return response.SerializeToString()


ANSWER = fixed_answer()
OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)]


def handler(behaviour):
    method = grpc.unary_unary_rpc_method_handler(behaviour)  # no (de)serializers: bytes in, bytes out
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})


def hold(seconds: float) -> None:
    """Keep the CPU busy for `seconds`, as the model does (a sleep would free the core)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def serve_sync(port: int, seconds: float) -> None:
    def answer(request, context):
        hold(seconds)
        return ANSWER

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=40), options=OPTIONS)
    server.add_generic_rpc_handlers((handler(answer),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print(f"bare sync gRPC server on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


async def serve_asyncio(port: int, seconds: float) -> None:
    async def answer(request, context):
        hold(seconds)
        return ANSWER

    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handler(answer),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop(0)))
    print(f"bare asyncio gRPC server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["sync", "asyncio"], default="sync")
    parser.add_argument("--hold-ms", type=float, default=0.0, help="CPU-busy time per call before answering")
    args = parser.parse_args(argv)
    if args.mode == "sync":
        serve_sync(args.port, args.hold_ms / 1000)
    else:
        asyncio.run(serve_asyncio(args.port, args.hold_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
