"""Is LiteRT faster than TensorFlow per image here, and does the way the model is converted change that?

    python bench/bench_litert_conversions.py [--quick]     (or: make bench-litert-conversions)

The Xception-size model (tests/standin.build_xception_size, random weights) as a tf.function, the way the model
server's TensorFlow runtime calls a SavedModel, against LiteRT (XNNPACK, one thread per core) running it converted
five ways: notebook 01's (both signatures, batch left open), one signature, the batch fixed at 1, the converter's
Keras path, and weights quantized to int8 (dynamic range). Each is timed at batch 1 and 8, median of several calls,
in one process, one after the other. Writes litert_conversions.md and .json (bench/README.md). --quick times the
small stand-in instead, a check that every step runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
from common import OUTPUT, machine, machine_line, markdown_table

SHAPE = (299, 299, 3)


def median_ms(call, repeats: int) -> float:
    call()  # the first call allocates and plans
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def conversions(model) -> dict[str, bytes]:
    """{description: .tflite bytes} for the ways of converting `model` compared here."""
    import tensorflow as tf

    import litert_model
    from contract import SIGNATURE_NAME, UINT8_SIGNATURE_NAME

    def signature(batch, dtype):
        spec = tf.TensorSpec([batch, *SHAPE], dtype)
        scale = (lambda x: tf.cast(x, tf.float32) / 127.5 - 1.0) if dtype == tf.uint8 else (lambda x: x)
        return tf.function(lambda x: {"dense_7": model(scale(x), training=False)}, input_signature=[spec])

    both = {SIGNATURE_NAME: signature(None, tf.float32), UINT8_SIGNATURE_NAME: signature(None, tf.uint8)}
    quantized = tf.lite.TFLiteConverter.from_concrete_functions([both[SIGNATURE_NAME].get_concrete_function()], model)
    quantized.optimizations = [tf.lite.Optimize.DEFAULT]
    return {
        "notebook 01's: both signatures, batch open": litert_model.convert(both, model),
        "one signature, batch open": litert_model.convert({SIGNATURE_NAME: both[SIGNATURE_NAME]}, model),
        "one signature, batch fixed at 1": litert_model.convert({SIGNATURE_NAME: signature(1, tf.float32)}, model),
        "the converter's Keras path (from_keras_model)": tf.lite.TFLiteConverter.from_keras_model(model).convert(),
        "weights as int8 (dynamic range)": quantized.convert(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small stand-in, two calls a timing (a smoke run)")
    args = parser.parse_args()
    repeats = {1: 2, 8: 1} if args.quick else {1: 15, 8: 4}

    import os

    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    import standin

    started = machine()  # the load average before the timings
    model = standin.build_standin() if args.quick else standin.build_xception_size()
    batches = {size: np.random.default_rng(size).uniform(-1, 1, (size, *SHAPE)).astype(np.float32) for size in (1, 8)}
    served = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, *SHAPE])])
    rows = [{"runtime": "TensorFlow, tf.function", "bytes": None, "ms": {}}]
    for size, x in batches.items():
        rows[0]["ms"][size] = median_ms(functools.partial(served, x), repeats[size])
    for name, content in conversions(model).items():
        interpreter = Interpreter(model_content=content, num_threads=os.cpu_count())
        signatures = interpreter.get_signature_list()
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        (input_name,) = runner.get_input_details()
        fixed = runner.get_input_details()[input_name]["shape_signature"][0] > 0
        row = {"runtime": f"LiteRT, {name}", "bytes": len(content), "signatures": len(signatures), "ms": {}}
        for size, x in batches.items():
            if not (fixed and size > 1):
                row["ms"][size] = median_ms(functools.partial(runner, **{input_name: x}), repeats[size])
        rows.append(row)
        print(f"{row['runtime']}: {row['ms']}", flush=True)

    results = {"machine": started, "mode": "quick" if args.quick else "full", "rows": rows}
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    tensorflow, m = rows[0]["ms"], results["machine"]
    model = "The small stand-in" if args.quick else "Xception-size model"
    lines = [
        "# LiteRT conversions against TensorFlow, per image",
        "",
        machine_line(results["machine"]),
        "",
        f"Run {m['date']} ({results['mode']}), load average {m['load_average_at_start']} at the start, "
        f"{m['load_average_at_end']} at the end. {model}, random weights;"
        " median ms per call. TensorFlow ÷ LiteRT above 1: LiteRT is faster.",
        "",
        markdown_table(
            ["runtime", "model size", "batch 1", "TF ÷ this", "batch 8", "TF ÷ this"],
            [
                [
                    row["runtime"],
                    f"{row['bytes'] / 1e6:.1f} MB" if row["bytes"] else "",
                    *(
                        cell
                        for size in (1, 8)
                        for cell in (
                            (f"{row['ms'][size]:.1f}", f"{tensorflow[size] / row['ms'][size]:.2f}")
                            if size in row["ms"]
                            else ("", "")
                        )
                    ),
                ]
                for row in rows
            ],
        ),
    ]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "litert_conversions.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUTPUT / "litert_conversions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
