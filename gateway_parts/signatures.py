"""Which of the model's signatures a batch goes to, under which tensor names, and in which dtype on the wire.

The course's signature takes float32 pixels scaled to [-1, 1]: 1,072,812 bytes an image. Notebook 01 also exports
UINT8_SIGNATURE_NAME, which takes the 8-bit pixels and scales them in the graph: a quarter of the bytes, the same
logits. The gateway asks the model server which signatures the model has (GetModelMetadata) and sends pixels as
uint8 where it can, unless GATEWAY_WIRE says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import protobuf
from contract import UINT8_SIGNATURE_NAME
from gateway_parts.images import scale

# A signature's input dtype (TensorFlow's DataType numbers), as the gateway sends it.
_WIRE_OF_DTYPE = {protobuf.DT_FLOAT: "float32", protobuf.DT_UINT8: "uint8"}


@dataclass(frozen=True)
class Route:
    """Where a batch of pixels goes: the signature, its tensor names, and what it takes on the wire."""

    signature: str
    input_name: str
    output_name: str
    wire: str  # "uint8": the pixels as they are; "float32": scaled first
    discovered: bool = True  # asked of the model server; False: all of it from the settings

    def tensor(self, batch: np.ndarray):
        """The batch as this signature takes it: uint8 pixels as they are, or scaled to float32 (once)."""
        if self.wire == "float32" and batch.dtype == np.uint8:
            batch = scale(batch)
        return protobuf.np_to_protobuf(batch)

    def describe(self) -> str:
        return f"to signature {self.signature}: {self.input_name} ({self.wire}) -> {self.output_name}"


# Routes are {"float32": Route or why not, "uint8": Route or why not}: a string says why that way is closed.


def routes_from_settings(settings) -> dict | None:
    """The routes when the settings name both tensors (nothing is asked of the model server then): float32, and
    uint8 too if GATEWAY_WIRE=uint8. None when the model server must be asked."""
    if not (settings.input_name and settings.output_name):
        return None
    names = (settings.input_name, settings.output_name)
    routes = {"float32": Route(settings.signature_name, *names, "float32", discovered=False)}
    if settings.wire == "uint8":
        routes["uint8"] = Route(UINT8_SIGNATURE_NAME, *names, "uint8", discovered=False)
    return routes


def routes_from_signatures(signatures, settings) -> dict:
    """The routes that a model with these signatures (name -> SignatureDef, from GetModelMetadata) offers."""
    model, has = settings.model_name, sorted(signatures)
    name = settings.signature_name
    if name in signatures:
        routes = {"float32": _route_to(name, signatures[name], "float32", settings)}
    else:
        routes = {"float32": f"model {model!r} has no signature {name!r} (it has {has}); set MODEL_SIGNATURE"}
    if UINT8_SIGNATURE_NAME in signatures:
        routes["uint8"] = _route_to(UINT8_SIGNATURE_NAME, signatures[UINT8_SIGNATURE_NAME], "uint8", settings)
    elif settings.wire == "uint8":
        routes["uint8"] = (
            f"GATEWAY_WIRE=uint8, but model {model!r} has no signature {UINT8_SIGNATURE_NAME!r} (it has {has}): "
            "export it with notebook 01 (make model), or set GATEWAY_WIRE=auto to fall back to float32"
        )
    return routes


def choose(routes: dict, dtype, wire: str) -> Route | str:
    """The route for a batch of `dtype` under GATEWAY_WIRE=`wire`, or why there is none. uint8 pixels take the
    uint8 route when there is one (and `wire` is not float32), else they are scaled for the float32 one; float32
    batches (already scaled) always take the float32 route."""
    if np.dtype(dtype) == np.uint8 and wire != "float32":
        pixels_in = routes.get("uint8")
        if isinstance(pixels_in, Route) or wire == "uint8":
            return pixels_in
    return routes["float32"]


def _route_to(name: str, signature, wire: str, settings) -> Route | str:
    """The route to a signature that takes `wire`, or why it cannot be used."""
    inputs, outputs = list(signature.inputs), list(signature.outputs)
    input_name = settings.input_name or (inputs[0] if len(inputs) == 1 else "")
    output_name = settings.output_name or (outputs[0] if len(outputs) == 1 else "")
    if not input_name or not output_name:
        return f"signature {name!r} has inputs {inputs} and outputs {outputs}; set MODEL_INPUT and MODEL_OUTPUT"
    if input_name not in signature.inputs:
        return f"signature {name!r} has no input {input_name!r} (it has {inputs})"
    dtype = signature.inputs[input_name].dtype
    if _WIRE_OF_DTYPE.get(dtype) != wire:
        return f"signature {name!r} takes {input_name!r} as TensorFlow DataType {dtype}, not {wire}"
    return Route(name, input_name, output_name, wire)
