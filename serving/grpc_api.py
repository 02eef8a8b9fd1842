"""TF Serving's gRPC API: PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus).

The methods are registered by their full names with grpcio's generic handlers, and their messages are protobuf.py's:
the same bytes as TF Serving's, without tensorflow-serving-api (which imports all of TensorFlow). A method not here,
such as ModelService's HandleReloadConfigRequest, is answered UNIMPLEMENTED by grpcio, as by TF Serving's stubs."""

from __future__ import annotations

import logging

import grpc

import protobuf
from contract import SIGNATURE_NAME
from serving.errors import Code, ServingError
from serving.predict import Predictor
from serving.tensors import array_to_tensor_proto, tensor_proto_to_array
from serving.versions import ModelManager, model_metadata, version_of

log = logging.getLogger("model_server")

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
SERVICE_NAMES = (PREDICTION_SERVICE, MODEL_SERVICE)


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


class PredictionService:
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
            response = protobuf.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = served.version
            response.model_spec.signature_name = signature_name
        for alias, value in outputs.items():
            array_to_tensor_proto(value, response.outputs[alias])
        return response

    def GetModelMetadata(self, request, context):
        return _answer(context, lambda: model_metadata(self.models, request))


class ModelService:
    def __init__(self, models: ModelManager):
        self.models = models

    def GetModelStatus(self, request, context):
        def status():
            if not request.HasField("model_spec"):
                raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
            return self.models.status(request.model_spec.name, version_of(request.model_spec))

        return _answer(context, status)


def _unary(method, request_class, response_class) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=request_class.FromString, response_serializer=response_class.SerializeToString
    )


def handlers(models: ModelManager, predictor: Predictor) -> list[grpc.GenericRpcHandler]:
    """Both services, for grpc.Server.add_generic_rpc_handlers."""
    prediction = PredictionService(models, predictor)
    status = ModelService(models)
    return [
        grpc.method_handlers_generic_handler(
            PREDICTION_SERVICE,
            {
                "Predict": _unary(prediction.Predict, protobuf.PredictRequest, protobuf.PredictResponse),
                "GetModelMetadata": _unary(
                    prediction.GetModelMetadata, protobuf.GetModelMetadataRequest, protobuf.GetModelMetadataResponse
                ),
            },
        ),
        grpc.method_handlers_generic_handler(
            MODEL_SERVICE,
            {
                "GetModelStatus": _unary(
                    status.GetModelStatus, protobuf.GetModelStatusRequest, protobuf.GetModelStatusResponse
                )
            },
        ),
    ]
