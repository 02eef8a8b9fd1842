"""`make demo` and `make serve`: both tiers start, answer, and stop completely, also on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

import real_answers
from conftest import PANTS, ROOT
from contract import CLASSES
from gateways import free_port


def _command(kind, model_base, ports, *extra):
    grpc, rest, gateway = ports
    return [
        sys.executable,
        "local_stack.py",
        kind,
        f"--model-base={model_base}",
        f"--grpc-port={grpc}",
        f"--rest-port={rest}",
        f"--gateway-port={gateway}",
        *extra,
    ]


def _descendants_alive(process: psutil.Process) -> list[psutil.Process]:
    return [p for p in process.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _listening(ports) -> set[int]:
    return {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port in ports}


@pytest.fixture
def ports():
    return free_port(), free_port(), free_port()


def test_demo_classifies_the_pants_photo_and_stops_everything(model_base, photo_folder, ports):
    done = subprocess.run(
        _command("demo", model_base, ports, f"--photo={photo_folder / PANTS}"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"classified {Path(PANTS).name} with clothing-model version 1" in done.stdout
    assert "  1. " in done.stdout and "  3. " in done.stdout
    answer = json.loads(done.stdout.split("{class: logit}: ", 1)[1].splitlines()[0])
    assert list(answer) == list(CLASSES)
    assert "stopped the model server and the gateway" in done.stdout
    assert not _listening(set(ports))


def test_serve_stops_both_tiers_on_ctrl_c(model_base, ports):
    process = subprocess.Popen(_command("serve", model_base, ports), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    said: list[str] = []
    serving = threading.Event()

    def read() -> None:  # all of it, to the end: a full pipe would stop the stack mid-sentence
        for line in process.stdout:
            said.append(line)
            if "serving on" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(120), "".join(said)
        # "serving on" follows one ready answer; each gunicorn worker connects to the model on its own.
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/readyz", timeout=5) as response:
                    assert json.load(response)["status"] == "ready"
                    break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline, "".join(said)
                time.sleep(0.2)
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 2  # the model server and gunicorn (with its worker)
        process.send_signal(signal.SIGINT)
        # local_stack gives each tier 30 s to stop before it kills it (and says so): 2 x 30 s, and some slack.
        assert process.wait(timeout=75) == 0, "".join(said)
        reader.join(10)
        assert not [line for line in said if "did not stop" in line], "".join(said)
        psutil.wait_procs(children, timeout=10)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not _listening(set(ports))
    finally:
        if process.poll() is None:
            process.kill()


def test_missing_model_and_busy_ports_are_explained(tmp_path, model_base, ports):
    missing = subprocess.run(_command("demo", tmp_path / "nothing", ports), cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "run `make model` first" in missing.stdout
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", ports[0]))
        busy.listen()
        taken = subprocess.run(_command("demo", model_base, ports), cwd=ROOT, capture_output=True, text=True)
    assert taken.returncode == 1 and f"port {ports[0]} (gRPC) is in use" in taken.stdout
    no_summary = _command("demo", model_base, ports, f"--trained={tmp_path / 'absent.json'}")
    unsaid = subprocess.run(no_summary, cwd=ROOT, capture_output=True, text=True)
    assert unsaid.returncode == 1 and "no summary of the trained model at" in unsaid.stdout


def test_make_demo_without_the_course_model_classifies_the_pants_photo_with_the_trained_model(dataset, tmp_path, ports):
    """The course model's download fails (here: a URL that refuses at once) and no MODEL_H5 is given: the demo
    says so, serves the small model trained here, converted into build/ (here tmp_path), says what it is and how
    well it does beside the course's model, classifies the course's pants photo as pants, and exits 0."""
    grpc, rest, gateway = ports
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "demo",
            "MODEL_URL=http://127.0.0.1:9/xception_v4_large_08_0.894.h5",
            f"MODEL_BASE={tmp_path / 'no-model'}",
            f"TRAINED_DIR={tmp_path / 'trained'}",
            f"GRPC_PORT={grpc}",
            f"REST_PORT={rest}",
            f"GATEWAY_PORT={gateway}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "No course model: going on with the small model trained here from the course's photos" in out
    summary = real_answers.summary()
    test, minutes = summary["test"], summary["training_seconds"] / 60
    assert "OFFLINE MODEL" in out and f"Top-1 on the 372 test photos: {test['accuracy']:.1%}" in out
    assert f"{summary['recipe']['epochs']} epochs in {minutes:.0f} min ({summary['machine']})" in out
    assert "The course's Xception, fine-tuned from ImageNet weights: 89.4% on validation" in out
    assert f"classified {Path(PANTS).name} with clothing-model version 1" in out and "\n  1. pants " in out
    assert "For the course's model: get xception_v4_large_08_0.894.h5" in out and "make demo MODEL_H5=" in out
    assert (tmp_path / "trained" / "models" / "clothing-model" / "1" / "saved_model.pb").is_file()
    assert not (tmp_path / "no-model").exists(), "the trained model never takes the course model's place"
    assert not _listening(set(ports))


def test_demo_without_a_dataset_photo_still_classifies_one(model_base, ports, tmp_path):
    """The photo given is not there: the course's URL, or where that cannot be fetched, a photo made here."""
    done = subprocess.run(
        _command("demo", model_base, ports, f"--photo={tmp_path / 'absent.jpg'}"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "classified http://bit.ly/mlbookcamp-pants" in done.stdout or (
        "cannot be fetched from here" in done.stdout and "classified a photo made by tests/photos.py" in done.stdout
    )
