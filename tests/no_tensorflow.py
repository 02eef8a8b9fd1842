"""Runs a Python script where TensorFlow cannot be imported, as in the LiteRT model-server image, which does not
install it: `python tests/no_tensorflow.py model_server.py --runtime=litert ...`. Any import of TensorFlow, TF
Serving's APIs or Keras fails, so a server that passes its tests this way runs without them."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BLOCKED = ("tensorflow", "tensorflow_serving", "keras", "tf_keras")

if __name__ == "__main__":
    for name in BLOCKED:
        sys.modules[name] = None  # `import tensorflow` now raises ModuleNotFoundError
    script = Path(sys.argv.pop(1)).resolve()  # the script sees its own arguments, and its folder on sys.path
    sys.path[0] = str(script.parent)
    runpy.run_path(str(script), run_name="__main__")
