# The model tier: TensorFlow Serving with the clothing model baked in (the course's zoomcamp-10-model image).
# Build from the repo root (`make build` does): docker build -f dockerfiles/image-model.dockerfile .
# BuildKit sends only what image-model.dockerfile.dockerignore lets through: the SavedModels and batching.config.
# The server tag matches the TensorFlow that converted the model (Pipfile: tensorflow ~=2.21.0); tests keep them equal.

FROM tensorflow/serving:2.21.0 AS model-check
ARG MODEL_VERSION=1
# "model[s]" is a wildcard: with no models/ it copies nothing rather than failing on a bare "not found",
# so the check below can say what to do.
COPY dockerfiles/batching.config model[s] /staging/
RUN test -f "/staging/clothing-model/${MODEL_VERSION}/saved_model.pb" \
    || { echo "No SavedModel at models/clothing-model/${MODEL_VERSION}/saved_model.pb: run \`make model\` first" >&2; exit 1; } \
    && chmod -R a+rX /staging

FROM tensorflow/serving:2.21.0
ARG MODEL_VERSION=1
# The base image's entrypoint serves ${MODEL_BASE_PATH}/${MODEL_NAME} (/models/clothing-model) and appends its
# arguments to tensorflow_model_server, which is how batching and other flags are switched on at run time.
ENV MODEL_NAME=clothing-model
COPY --from=model-check /staging/clothing-model/${MODEL_VERSION} /models/clothing-model/1
COPY --from=model-check /staging/batching.config /etc/tf-serving/batching.config
# The server only reads the model: run it as nobody (Kubernetes sets the same uid).
USER 65534:65534
EXPOSE 8500 8501
