"""Run model_server.py for a test on free ports, wait until it is SERVING, and always stop it.

    with running_model_server(model_base, enable_batching=True) as server:
        stub = PredictionServiceStub(server.channel())

Keyword arguments become model_server.py flags (`file_system_poll_wait_seconds=0.2` ->
`--file_system_poll_wait_seconds=0.2`); `rest_api_port=0` turns REST off. With `runtime="litert"` the server runs
where TensorFlow cannot be imported (tests/no_tensorflow.py), as in its image.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract import MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("tensorflow", "litert")  # model_server.py --runtime, for tests that run on both
# Room for a 32-image batch both ways, as the server allows.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningModelServer:
    grpc_target: str  # host:port for grpc.insecure_channel
    rest_url: str | None  # http://host:port, None with REST off
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_target, options=CHANNEL_OPTIONS)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"--{name}={value}"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running_model_server(model_base, *, startup_timeout: float = 90, wait_serving: bool = True, **flags):
    """model_server.py serving `model_base` on 127.0.0.1; yields a RunningModelServer once it listens
    (and, with `wait_serving`, once its health check says SERVING)."""
    with tempfile.TemporaryDirectory(prefix="model-server-") as log_dir:
        # The REST port is picked here, so another process may take it first: try again on a new one.
        for attempt in range(3):
            server = _start(Path(model_base), Path(log_dir) / f"server-{attempt}.log", flags)
            try:
                _wait_until_up(server, startup_timeout, wait_serving)
            except _PortTaken:
                continue
            except BaseException:
                terminate(server.process)
                raise
            break
        else:
            raise RuntimeError(f"model_server.py found no free REST port in 3 tries:\n{_tail(server.log())}")
        try:
            yield server
        finally:
            terminate(server.process)


class _PortTaken(Exception):
    pass


def _start(model_base: Path, log_path: Path, flags: dict) -> RunningModelServer:
    options = {"host": "127.0.0.1", "port": 0, "model_name": MODEL_NAME, "model_base_path": model_base, **flags}
    if "rest_api_port" not in flags:
        options["rest_api_port"] = free_port()
    command = [sys.executable, str(ROOT / "model_server.py")]
    if options.get("runtime") == "litert":
        command.insert(1, str(ROOT / "tests" / "no_tensorflow.py"))
    command += [_flag(name, value) for name, value in options.items() if value is not None]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    rest_port = options["rest_api_port"]
    rest_url = f"http://127.0.0.1:{rest_port}" if rest_port else None
    return RunningModelServer(grpc_target="", rest_url=rest_url, process=process, log_path=log_path)


def _wait_until_up(server: RunningModelServer, timeout: float, wait_serving: bool) -> None:
    deadline = time.monotonic() + timeout
    while not server.grpc_target:
        if server.process.poll() is not None:
            text = server.log()
            if "Cannot listen for REST" in text:
                raise _PortTaken()
            raise RuntimeError(f"model_server.py exited with {server.process.returncode}:\n{_tail(text)}")
        # With --port=0 the log line says which port the server got.
        match = re.search(r"gRPC on [\d.]+:(\d+)", server.log())
        if match and (server.rest_url is None or "REST on" in server.log()):
            server.grpc_target = f"127.0.0.1:{match.group(1)}"
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"model_server.py did not listen within {timeout:.0f} s:\n{_tail(server.log())}")
        time.sleep(0.1)
    if not wait_serving:
        return
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"model_server.py never became SERVING:\n{_tail(server.log())}")
            time.sleep(0.1)


def terminate(process: subprocess.Popen) -> None:
    """SIGTERM, up to 40 s for a graceful exit, then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
