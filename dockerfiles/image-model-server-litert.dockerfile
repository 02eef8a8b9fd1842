# The model tier on LiteRT: model_server.py --runtime=litert with the clothing model's model.tflite baked in, and no
# TensorFlow (LiteRT's runtime is 59 MB installed). The same contract as tensorflow/serving and as
# image-model-server.dockerfile: ports 8500 and 8501, MODEL_NAME and MODEL_BASE_PATH, the model at
# /models/clothing-model/1, extra arguments passed on to the server. It builds for linux/amd64 and linux/arm64
# (ai-edge-litert publishes both wheels) and is ready within a second or two of starting: the small, fast model tier
# for CPUs and arm64 nodes (docs/model-server.md says when to choose which).
# Build from the repo root (`make build MODEL_SERVER=litert` does):
#   docker build -f dockerfiles/image-model-server-litert.dockerfile .
# BuildKit sends only what image-model-server-litert.dockerfile.dockerignore lets through.
ARG PYTHON_IMAGE=python:3.11.15-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ARG PIPENV_VERSION=2026.10.3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIPENV_VERBOSITY=-1
RUN python3 -m venv /opt/pipenv && /opt/pipenv/bin/pip install --no-cache-dir "pipenv==${PIPENV_VERSION}"
WORKDIR /build
COPY Pipfile Pipfile.lock ./
# The lock's [model-server-litert] section only (LiteRT, numpy, grpcio, protobuf, werkzeug), hashes checked, into a
# venv without pip. What a CPU server never loads stays behind, about 50 MB: LiteRT's WebGPU accelerator, its NPU
# vendor plugins, ahead-of-time compiler and model tools, and numpy's own test suites.
RUN /opt/pipenv/bin/pipenv verify \
    && /opt/pipenv/bin/pipenv requirements --hash --categories model-server-litert >requirements.txt \
    && python3 -m venv --without-pip /opt/venv \
    && /opt/pipenv/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-deps --require-hashes \
        -r requirements.txt \
    && rm -rf /opt/venv/lib/python3*/site-packages/ai_edge_litert/libLiteRtWebGpuAccelerator.so \
        /opt/venv/lib/python3*/site-packages/ai_edge_litert/vendors \
        /opt/venv/lib/python3*/site-packages/ai_edge_litert/aot \
        /opt/venv/lib/python3*/site-packages/ai_edge_litert/tools \
    && find /opt/venv/lib/python3*/site-packages/numpy -type d -name tests -prune -exec rm -rf {} +
ARG MODEL_VERSION=1
# "model[s]" is a wildcard: with no models/ it copies nothing rather than failing on a bare "not found",
# so the check below can say what to do.
COPY dockerfiles/batching.config model[s] /staging/
RUN test -f "/staging/clothing-model/${MODEL_VERSION}/model.tflite" \
    || { echo "No LiteRT model at models/clothing-model/${MODEL_VERSION}/model.tflite: run \`make model\` first" >&2; exit 1; } \
    && chmod -R a+rX /staging

FROM ${PYTHON_IMAGE}
ARG MODEL_VERSION=1
# MODEL_NAME and MODEL_BASE_PATH as the tensorflow/serving image reads them: it serves $MODEL_BASE_PATH/$MODEL_NAME.
# MODEL_RUNTIME picks model_server.py's LiteRT runtime (--runtime=litert).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    MODEL_NAME=clothing-model MODEL_BASE_PATH=/models MODEL_RUNTIME=litert
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY model_server.py contract.py protobuf.py ./
COPY serving/ ./serving/
COPY --from=builder /staging/clothing-model/${MODEL_VERSION}/model.tflite /models/clothing-model/1/model.tflite
COPY --from=builder /staging/batching.config /etc/tf-serving/batching.config
# The server only reads the model: it runs as nobody, as the tensorflow/serving images here do.
USER 65534:65534
EXPOSE 8500 8501
# Healthy once the model is AVAILABLE (REST status, standard library only): under two seconds after the start here.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; b = u.urlopen('http://127.0.0.1:8501/v1/models/' + os.environ['MODEL_NAME'], timeout=2).read(); raise SystemExit(b'AVAILABLE' not in b)"]
# Python is PID 1 and model_server.py handles SIGTERM itself (in-flight requests finish, then it exits).
# As with tensorflow/serving, arguments after the image name go to the server: `docker run IMAGE --enable_batching`.
ENTRYPOINT ["python", "/app/model_server.py"]
