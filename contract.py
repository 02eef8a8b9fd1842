"""The contract every tier shares: model name, tensor names, classes, preprocessing and ports.

Imported by the notebooks, the gateway, the local model server and the tests; the Dockerfiles,
compose file and Kubernetes manifests are checked against it by tests/test_consistency.py and
tests/test_k8s.py. Change a value here and those tests say what else must follow.
"""

MODEL_NAME = "clothing-model"
SIGNATURE_NAME = "serving_default"
# A second signature (notebook 01): the same input and output names, the pixels as uint8, scaled in the graph.
UINT8_SIGNATURE_NAME = "serving_uint8"
INPUT_NAME = "input_8"
OUTPUT_NAME = "dense_7"

# The course model's classes, in the order of its ten outputs.
CLASSES = (
    "dress",
    "hat",
    "longsleeve",
    "outwear",
    "pants",
    "shirt",
    "shoes",
    "shorts",
    "skirt",
    "t-shirt",
)

IMAGE_SIZE = (299, 299)  # width, height (PIL order); the tensor is -1 x 299 x 299 x 3

GRPC_PORT = 8500
REST_PORT = 8501
GATEWAY_PORT = 9696

# Where the gateway finds the model tier, as in the course.
TF_SERVING_HOST_ENV = "TF_SERVING_HOST"
DEFAULT_TF_SERVING_HOST = f"localhost:{GRPC_PORT}"

# TF Serving's layout: <base>/<integer version>/saved_model.pb
MODEL_BASE_PATH = f"models/{MODEL_NAME}"
