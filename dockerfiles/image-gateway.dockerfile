# The gateway tier: the Flask app under gunicorn, CPU only, no TensorFlow (the course's zoomcamp-10-gateway image).
# Build from the repo root (`make build` does): docker build -f dockerfiles/image-gateway.dockerfile .
# The root .dockerignore lets through only the files copied below.
# PYTHON_IMAGE: the official slim image by default; any Debian-based Python 3.11 with venv works (`make build
# PYTHON_IMAGE=...`). Nothing here depends on where that Python keeps its packages: the runtime is a venv.
ARG PYTHON_IMAGE=python:3.11.15-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ARG PIPENV_VERSION=2026.10.3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIPENV_VERBOSITY=-1
# pipenv gets a venv of its own, so neither it nor its dependencies reach the runtime stage.
RUN python3 -m venv /opt/pipenv && /opt/pipenv/bin/pip install --no-cache-dir "pipenv==${PIPENV_VERSION}"
WORKDIR /build
COPY Pipfile Pipfile.lock ./
# verify: stop if the lock is out of date with the Pipfile. Then the [packages] section only, each file checked
# against the lock's hashes, into a venv without pip: the runtime stage copies that venv whole.
RUN /opt/pipenv/bin/pipenv verify \
    && /opt/pipenv/bin/pipenv requirements --hash >requirements.txt \
    && python3 -m venv --without-pip /opt/venv \
    && /opt/pipenv/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-deps --require-hashes \
        -r requirements.txt

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=builder /opt/venv /opt/venv
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY gateway.py protobuf.py contract.py safe_fetch.py gunicorn.conf.py gateway.html ./
COPY gateway_parts/ ./gateway_parts/
USER 10001:10001
EXPOSE 9696
# Slim images have no curl: probe with the standard library, on the port contract.py names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u, contract as c; u.urlopen(f'http://127.0.0.1:{c.GATEWAY_PORT}/healthz', timeout=2)"]
# gunicorn is PID 1: its master handles SIGTERM (drain, then exit) and reaps its workers.
CMD ["gunicorn", "--config", "gunicorn.conf.py", "gateway:app"]
