# The gateway tier: the Flask app under gunicorn, CPU only, no TensorFlow (the course's zoomcamp-10-gateway image).
# Build from the repo root (`make build` does): docker build -f dockerfiles/image-gateway.dockerfile .
# The root .dockerignore lets through only the files copied below.

FROM python:3.11.15-slim-trixie AS builder
ARG PIPENV_VERSION=2026.10.3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIPENV_VERBOSITY=-1
# pipenv gets a venv of its own, so neither it nor its dependencies reach the runtime stage.
RUN python -m venv /opt/pipenv && /opt/pipenv/bin/pip install --no-cache-dir "pipenv==${PIPENV_VERSION}"
WORKDIR /build
COPY Pipfile Pipfile.lock ./
# --system: into /usr/local, which the runtime stage copies; --deploy: stop if the lock is out of date;
# no --dev: the [packages] section only.
RUN /opt/pipenv/bin/pipenv install --system --deploy

FROM python:3.11.15-slim-trixie
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=builder /usr/local/lib/python3.11/site-packages /usr/local/lib/python3.11/site-packages
COPY --from=builder /usr/local/bin/gunicorn /usr/local/bin/gunicorn
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY gateway.py protobuf.py contract.py safe_fetch.py gunicorn.conf.py ./
USER 10001:10001
EXPOSE 9696
# Slim images have no curl: probe with the standard library, on the port contract.py names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u, contract as c; u.urlopen(f'http://127.0.0.1:{c.GATEWAY_PORT}/healthz', timeout=2)"]
CMD ["gunicorn", "--config", "gunicorn.conf.py", "gateway:app"]
