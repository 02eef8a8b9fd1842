"""Both tiers on this machine, without Docker: the local model server and the gateway under gunicorn.

    python local_stack.py demo    # start both, classify the pants photo, print the answer, stop both
    python local_stack.py serve   # start both and keep them running until Ctrl-C

`make demo` and `make serve` run these after making sure the SavedModel exists (`make model`; where the course's
model cannot be had, the small one trained here, converted by `make trained-model`, and `--trained` says so).
Whatever happens (success, an error, Ctrl-C, SIGTERM), every process this script started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from contract import GATEWAY_PORT, GRPC_PORT, MODEL_BASE_PATH, MODEL_NAME, REST_PORT

ROOT = Path(__file__).resolve().parent
# The course's example photo (its bit.ly link below): the dataset's test/pants/4aabd82c-….jpg, where the course's
# photos are beside the repository (or in CLOTHING_DATASET).
DATASET = Path(os.environ.get("CLOTHING_DATASET", ROOT.parent / "shared" / "data" / "clothing-dataset-small"))
PANTS_PHOTO = DATASET / "test" / "pants" / "4aabd82c-82e1-4181-a84d-d0c6e550d26d.jpg"
PANTS_URL = "http://bit.ly/mlbookcamp-pants"  # the course's own request, where that file is not there


class StackError(Exception):
    """Something the person running the stack can fix; the message says what."""


def say(message: str) -> None:
    print(f"[local-stack] {message}", flush=True)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # noqa: S104 (the servers bind all interfaces; check the same)
        except OSError:
            return False
        return True


def has_version(model_base: Path) -> bool:
    return any(p.name.isdigit() and (p / "saved_model.pb").is_file() for p in model_base.glob("*"))


class Stack:
    """The started processes, each in its own session so one Ctrl-C is handled here, in order."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append((name, process, log_path))
        return process

    def check_alive(self) -> None:
        for name, process, log_path in self.processes:
            if process.poll() is not None:
                raise StackError(f"the {name} exited with code {process.returncode}:\n{tail(log_path)}")

    def stop(self) -> None:
        """Gateway first (it stops taking requests), then the model server; SIGTERM, then SIGKILL after 30 s."""
        for name, process, _ in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    say(f"the {name} did not stop within 30 s: killing it")
                    process.kill()
                    process.wait()
        self.processes.clear()


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until_ready(stack: Stack, gateway_url: str, timeout: float) -> dict:
    """Poll the gateway's /readyz until the model is AVAILABLE behind it."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            with urllib.request.urlopen(f"{gateway_url}/readyz", timeout=2) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            last = json.load(error).get("error", {}).get("message", str(error))
        except OSError as error:
            last = str(error)
        time.sleep(0.5)
    raise StackError(f"the stack was not ready within {timeout:.0f} s: {last}")


def _predict(gateway_url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(
        f"{gateway_url}/predict?detail=1&top_k=3", data=body, headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _made_photo() -> bytes:
    """A photo the test suite's generator makes (tests/photos.py): for a machine without the dataset or internet."""
    sys.path.insert(0, str(ROOT / "tests"))
    import photos

    return photos.jpeg(seed=1)


def classify(gateway_url: str, photo: Path | None) -> dict:
    """The photo through the gateway: uploaded (the dataset's pants photo unless --photo names another); where that
    file is not there, the course's URL request; and where that URL cannot be fetched (no internet), a photo made
    here, so the two tiers still show they answer."""
    try:
        if photo is not None and photo.is_file():
            answer, source = _predict(gateway_url, photo.read_bytes(), "image/jpeg"), photo.name
        else:
            try:
                answer = _predict(gateway_url, json.dumps({"url": PANTS_URL}).encode(), "application/json")
                source = PANTS_URL
            except urllib.error.HTTPError as error:
                if error.code != 422:  # url_unreachable and the like: the photo's host, not the stack
                    raise
                say(f"the course's photo ({PANTS_URL}) cannot be fetched from here: classifying a made-up photo")
                answer, source = _predict(gateway_url, _made_photo(), "image/jpeg"), "a photo made by tests/photos.py"
    except urllib.error.HTTPError as error:
        raise StackError(f"the gateway answered {error.code}: {error.read().decode(errors='replace')}") from None
    answer["source"] = source
    return answer


def describe_trained(summary: dict) -> str:
    """What the model trained here is and how well it does, from the summary notebook 00 wrote beside it."""
    test, validation, course = summary["test"], summary["validation"], summary["course_model"]
    network = f"{summary['parameters'] / 1e6:.1f} M parameters, {summary['image_size']} px"
    trained = f"{summary['recipe']['epochs']} epochs in {summary['training_seconds'] / 60:.0f} min"
    lines = [
        "OFFLINE MODEL: the course's model could not be had, so this serves a small network trained here",
        f"from the course's photos (notebook 00: {summary['file']}, {network}),",
        f"{trained} ({summary['machine']}).",
        f"Top-1 on the {test['photos']} test photos: {test['accuracy']:.1%} ({test['correct']} right); "
        f"on the {validation['photos']} validation photos: {validation['accuracy']:.1%}.",
        f"The course's Xception, fine-tuned from ImageNet weights: {course['validation_accuracy']:.1%} on validation.",
    ]
    rule = "  " + "=" * 100
    return "\n".join(["", rule, *(f"   {line}" for line in lines), rule])


COURSE_MODEL_HINT = (
    "For the course's model: get xception_v4_large_08_0.894.h5 and run "
    "`make demo MODEL_H5=/path/to/xception_v4_large_08_0.894.h5`, or `make demo` where it can be downloaded."
)


def show(answer: dict) -> None:
    prediction = answer["predictions"][0]
    say(f"classified {answer['source']} with {answer['model']['name']} version {answer['model']['version']}")
    for rank, top in enumerate(prediction["top"], 1):
        logit = prediction["logits"][top["class"]]
        print(f"  {rank}. {top['class']:<11} probability {top['probability']:.3f}  (logit {logit:+.3f})")
    print("  the course's answer, {class: logit}:", json.dumps(prediction["logits"]))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["demo", "serve"])
    parser.add_argument("--model-base", type=Path, default=ROOT / MODEL_BASE_PATH)
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", GRPC_PORT)))
    parser.add_argument("--rest-port", type=int, default=int(os.environ.get("REST_PORT", REST_PORT)))
    parser.add_argument("--gateway-port", type=int, default=int(os.environ.get("GATEWAY_PORT", GATEWAY_PORT)))
    parser.add_argument("--photo", type=Path, default=PANTS_PHOTO, help="photo to classify in the demo")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument(
        "--trained",
        type=Path,
        metavar="SUMMARY",
        help="the model is the one trained here (notebook 00); SUMMARY is the .json beside it: say what it is",
    )
    args = parser.parse_args(argv)

    # Ctrl-C and SIGTERM both end in the `finally` below, which stops every started process. SIGINT is set here
    # too: a shell starts background jobs with it ignored, and Python then never turns it into KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with tempfile.TemporaryDirectory(prefix="local-stack-") as log_dir:
        stack = Stack(Path(log_dir))
        try:
            return run(args, stack)
        except StackError as error:
            say(f"error: {error}")
            return 1
        except KeyboardInterrupt:
            say("stopping")
            return 0
        finally:
            stack.stop()
            say("stopped the model server and the gateway")


def run(args, stack: Stack) -> int:
    if not has_version(args.model_base):
        raise StackError(f"no SavedModel version under {args.model_base}: run `make model` first")
    if args.trained and not args.trained.is_file():
        raise StackError(f"no summary of the trained model at {args.trained}: `make train` writes it beside the .h5")
    about = describe_trained(json.loads(args.trained.read_text())) if args.trained else None
    for name, port in (("gRPC", args.grpc_port), ("REST", args.rest_port), ("gateway", args.gateway_port)):
        if not port_is_free(port):
            raise StackError(
                f"port {port} ({name}) is in use: is `make serve` already running? "
                "Stop it, or choose other ports: make demo GRPC_PORT=… REST_PORT=… GATEWAY_PORT=…"
            )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    ports = f"gRPC :{args.grpc_port}, REST :{args.rest_port}"
    say(f"starting the model server: {MODEL_NAME} from {args.model_base}, {ports}")
    stack.start(
        "model server",
        [
            sys.executable,
            "model_server.py",
            f"--port={args.grpc_port}",
            f"--rest_api_port={args.rest_port}",
            f"--model_name={MODEL_NAME}",
            f"--model_base_path={args.model_base.resolve()}",
        ],
        env,
    )
    gateway_url = f"http://localhost:{args.gateway_port}"
    say(f"starting the gateway: gunicorn on :{args.gateway_port} -> model at localhost:{args.grpc_port}")
    stack.start(
        "gateway",
        [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "gateway:app"],
        {**env, "TF_SERVING_HOST": f"localhost:{args.grpc_port}", "GATEWAY_BIND": f"0.0.0.0:{args.gateway_port}"},
    )
    ready = wait_until_ready(stack, gateway_url, args.ready_timeout)
    say(f"ready: {ready['model']} {ready['detail']}")
    if about:
        print(about)
    if args.command == "demo":
        show(classify(gateway_url, args.photo))
        if args.trained:
            say(COURSE_MODEL_HINT)
        return 0
    say(f"serving on {gateway_url} (Ctrl-C stops both tiers). Try:")
    print(
        f"""  curl -s -X POST {gateway_url}/predict -H 'Content-Type: application/json' -d '{{"url": "{PANTS_URL}"}}'"""
    )
    print(f"  curl -s -X POST {gateway_url}/predict -F image=@photo.jpg")
    print(f"  curl -s {gateway_url}/metrics | grep gateway_")
    while True:
        stack.check_alive()
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
