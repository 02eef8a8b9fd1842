"""The parts of model_server.py, TF Serving's APIs in Python, one module each (as TF Serving keeps its own apart):

- `errors`: the status codes TF Serving answers with, and their HTTP statuses;
- `versions`: the model's numbered versions on disk, loading, hot swap, status and metadata;
- `batching`: concurrent requests merged into one model call (--enable_batching);
- `predict`: a Predict request's admission, checks, run and tensor conversions, shared by both APIs;
- `grpc_api` and `rest_api`: the two APIs.

model_server.py wires them together and is how the server is started, with TF Serving's flags.
"""
