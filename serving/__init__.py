"""The parts of model_server.py, TF Serving's APIs in Python, one module each (as TF Serving keeps its own apart):

- `errors`: the status codes TF Serving answers with, and their HTTP statuses;
- `tensors`: a signature's tensors, and TensorProto to and from numpy, without TensorFlow;
- `versions`: the model's numbered versions on disk, loading, hot swap, status and metadata;
- `batching`: concurrent requests merged into one model call (--enable_batching);
- `predict`: a Predict request's admission, checks and run, shared by both APIs;
- `grpc_api` and `rest_api`: the two APIs;
- `runtime_tensorflow` and `runtime_litert`: what loads and runs a version (--runtime), the SavedModel with TensorFlow
  or model.tflite with LiteRT; model_server.py imports the chosen one only, so the LiteRT server runs without
  TensorFlow.

model_server.py wires them together and is how the server is started, with TF Serving's flags.
"""
