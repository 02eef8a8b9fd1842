"""What every benchmark here shares: the machine's description, percentiles, targets and markdown tables.

Importing this module also puts the repository root and tests/ on sys.path, so a benchmark run as
`python bench/<name>.py` imports the gateway, the contract and the tests' server runners as the tests do.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Where the reports go: bench/ (git-ignored there), or BENCH_OUTPUT (the tests' quick runs write to a folder of their
# own, so that a smoke run never replaces a measurement).
OUTPUT = Path(os.environ.get("BENCH_OUTPUT") or BENCH)
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
# Quiet TensorFlow's C++ start-up lines here and in every process a benchmark starts.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    # The installed version, read without importing the package (importing TensorFlow takes seconds).
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict:
    """The machine and software a benchmark ran on, for its report (the keys bench_model_server.py uses, and more)."""
    import psutil

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "gpu": "NVIDIA device present" if os.path.exists("/dev/nvidia0") else "none visible",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "grpcio": _version("grpcio"),
        "commit": _git_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(m: dict) -> str:
    """One line for a report; takes what a benchmark recorded, so older or partial records still print."""
    cores = f"{m.get('cores', '?')} logical cores"
    if m.get("physical_cores"):
        cores += f" ({m['physical_cores']} physical)"
    parts = [m.get("cpu", "unknown CPU"), cores]
    if m.get("memory_gb"):
        parts.append(f"{m['memory_gb']} GB RAM")
    if m.get("gpu"):
        parts.append(f"GPU: {m['gpu']}")
    line = ", ".join(parts)
    if m.get("os"):
        line += f"; {m['os']}"
    line += f"; Python {m.get('python', '?')}, TensorFlow {m.get('tensorflow', '?')}"
    if m.get("commit"):
        line += f"; commit {m['commit']}"
    return line


def latency_ms(seconds: list[float]) -> dict:
    """p50 and p99 (and the count they come from) of durations in seconds, in milliseconds."""
    values = np.asarray(seconds) * 1000
    return {"n": len(values), "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def target(name: str, measured: float, unit: str, limit: float, at_most: bool) -> dict:
    """A target from an issue and what was measured; ratio is measured / limit, met by <= 1 or >= 1."""
    ratio = measured / limit
    return {
        "name": name,
        "target": f"{'≤' if at_most else '≥'} {limit:g} {unit}".strip(),
        "measured": measured,
        "unit": unit,
        "limit": limit,
        "at_most": at_most,
        "ratio": ratio,
        "met": ratio <= 1 if at_most else ratio >= 1,
    }


def targets_table(targets: list[dict], part: str | None = None) -> str:
    rows = [
        ([part] if part else [])
        + [
            t["name"],
            t["target"],
            f"{t['measured']:.4g} {t['unit']}".strip(),
            # enough digits that a near miss does not print as the limit; none for a count that must be zero
            "" if t["ratio"] is None else f"{t['ratio']:.4f}",
            "met" if t["met"] else "**not met**",
        ]
        for t in targets
    ]
    headers = (["part"] if part else []) + ["target", "required", "measured", "measured / required", "result"]
    return markdown_table(headers, rows)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def prepare_model(work: Path) -> tuple[Path, str]:
    """A TF Serving base folder: models/clothing-model when `make model` made one, else the stand-in
    converted by notebook 01 exactly as `make model` converts the course model."""
    from contract import MODEL_BASE_PATH

    given = os.environ.get("BENCH_MODEL_BASE")  # the tests pass the stand-in they converted already
    if given:
        return Path(given), f"{given} (BENCH_MODEL_BASE)"
    real = ROOT / MODEL_BASE_PATH
    if any(real.glob("*/saved_model.pb")):
        return real, f"{MODEL_BASE_PATH} (made by `make model`: the course model unless MODEL_H5 named another)"
    base = convert_with_notebook_01(work, "save_standin_h5")
    return base, (
        "the stand-in (tests/standin.py: the course model's structure and names at reduced width, random "
        "weights), converted by notebook 01; the course model is not reachable here"
    )


def convert_with_notebook_01(work: Path, saver: str) -> Path:
    """tests/standin.py's `saver` writes a model as HDF5 (in a subprocess: Keras 2 and the notebook's TensorFlow
    stay apart); notebook 01 converts it exactly as `make model` converts the course model, with both signatures.
    Returns the TF Serving base folder <work>/models/clothing-model (version 1)."""
    import papermill

    from contract import MODEL_NAME

    h5 = work / "model.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    build = f"import sys; from pathlib import Path; from standin import {saver}; {saver}(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", build, str(h5)], cwd=ROOT, env=env, check=True)
    base = work / "models" / MODEL_NAME
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "01-convert-model.ipynb"),
        str(work / "01-convert-model.ipynb"),
        # LiteRT's parity with TensorFlow on 8 photos: the notebook's check, not a measurement here.
        parameters={"model_h5": str(h5), "output_base": str(base), "version": 1, "photo_count": 8},
        cwd=str(ROOT),
        progress_bar=False,
    )
    h5.unlink()
    return base
