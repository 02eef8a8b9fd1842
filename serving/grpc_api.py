"""TF Serving's gRPC API: PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus)."""

from __future__ import annotations

import logging

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

from contract import SIGNATURE_NAME
from serving.errors import Code, ServingError
from serving.predict import Predictor, array_to_tensor_proto, tensor_proto_to_array
from serving.versions import ModelManager, model_metadata, version_of

log = logging.getLogger("model_server")

SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


def _answer(context: grpc.ServicerContext, handler):
    """Run a handler; errors become the status TF Serving would give, never UNKNOWN with a traceback."""
    try:
        return handler()
    except ServingError as e:
        error = e
    except Exception as e:
        log.exception("Unexpected error in a gRPC call")
        error = ServingError(Code.INTERNAL, f"{type(e).__name__}: {e}")
    context.abort(error.code, error.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models: ModelManager, predictor: Predictor):
        self.models = models
        self.predictor = predictor

    def Predict(self, request, context):
        return _answer(context, lambda: self._predict(request))

    def _predict(self, request):
        spec = request.model_spec
        signature_name = spec.signature_name or SIGNATURE_NAME
        with self.predictor.admit(), self.models.use(spec.name, version_of(spec), spec.version_label) as served:
            signature = served.signatures.get(signature_name)
            if signature is None:
                raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
            self.predictor.check_input_names(signature, request.inputs)
            aliases = self.predictor.output_aliases(signature, request.output_filter)
            inputs = {a: tensor_proto_to_array(a, p, signature.inputs[a]) for a, p in request.inputs.items()}
            outputs = self.predictor.run(served, signature, inputs, aliases)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = served.version
            response.model_spec.signature_name = signature_name
        for alias, value in outputs.items():
            array_to_tensor_proto(value, response.outputs[alias])
        return response

    def GetModelMetadata(self, request, context):
        return _answer(context, lambda: model_metadata(self.models, request))


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, models: ModelManager):
        self.models = models

    def GetModelStatus(self, request, context):
        def status():
            if not request.HasField("model_spec"):
                raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
            return self.models.status(request.model_spec.name, version_of(request.model_spec))

        return _answer(context, status)
