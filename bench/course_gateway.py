"""The course's gateway approach, re-created by our team for measurement only (bench_gateway.py serves it).

As in ML Zoomcamp module 10: keras-image-helper's `from_url` (urllib's urlopen, then a full decode and a
NEAREST resize), `tf.make_tensor_proto`, and tensorflow-serving-api's PredictionServiceStub, behind Flask.
It fetches any URL with no limit and imports all of TensorFlow: never serve it. It is here so the
benchmark compares our gateway with that approach on the same machine, photos and model server.
"""

import os

import grpc
import tensorflow as tf
from flask import Flask, jsonify, request
from keras_image_helper import create_preprocessor
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from contract import CLASSES, DEFAULT_TF_SERVING_HOST, IMAGE_SIZE, INPUT_NAME, MODEL_NAME, OUTPUT_NAME, SIGNATURE_NAME

channel = grpc.insecure_channel(os.environ.get("TF_SERVING_HOST", DEFAULT_TF_SERVING_HOST))
stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
preprocessor = create_preprocessor("xception", target_size=IMAGE_SIZE)

app = Flask("course-gateway")


@app.post("/predict")
def predict():
    images = preprocessor.from_url(request.get_json()["url"])
    pb_request = predict_pb2.PredictRequest()
    pb_request.model_spec.name = MODEL_NAME
    pb_request.model_spec.signature_name = SIGNATURE_NAME
    pb_request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(images, shape=images.shape))
    pb_response = stub.Predict(pb_request, timeout=20.0)
    return jsonify(dict(zip(CLASSES, pb_response.outputs[OUTPUT_NAME].float_val, strict=True)))


@app.get("/healthz")
def healthz():
    return jsonify(status="ok")
