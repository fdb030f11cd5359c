"""int8 MiniLM whose activations are quantised token by token.

ONNX Runtime's dynamic quantiser gives each MatMul input one (scale, zero point) for the
whole tensor, so every text in a run, padding included, moves every other text's int8
vector: such a model can only encode one text per run. It has no per-row option, and
ONNX Runtime's MatMulInteger takes a single zero point for its first input, so this pass
replaces each DynamicQuantizeLinear with a symmetric quantiser per token row (scale =
the row's largest magnitude / 127, zero point 128). A token's int8 row then depends on
that token alone, a text's vector on that text alone, and texts can share a run.

The row scale is applied after the dequantising Mul rather than folded into it: ONNX
Runtime fuses MatMulInteger → Cast → Mul into MatMulIntegerToFloat, which reads the
scale of its first input as one number, so a row scale inside that Mul would be misread.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_CONSTANTS: dict[str, np.ndarray] = {
    "per_token_last_axis": np.array([-1], dtype=np.int64),
    "per_token_eps": np.array(1e-8, dtype=np.float32),
    "per_token_127": np.array(127.0, dtype=np.float32),
    "per_token_128": np.array(128.0, dtype=np.float32),
    "per_token_0": np.array(0.0, dtype=np.float32),
    "per_token_1": np.array(1.0, dtype=np.float32),
    "per_token_255": np.array(255.0, dtype=np.float32),
    "per_token_zero_point": np.array(128, dtype=np.uint8),
}


def quantise(float_model: Path, target: Path) -> None:
    """Write an int8 copy of ``float_model``: per-channel int8 weights, per-token inputs.

    ONNX Runtime's own dynamic quantiser rather than sentence-transformers'
    ``export_dynamic_quantized_onnx_model``: that one quantises weights per tensor, which
    moves embeddings much further from the float ones than per-channel weights of the
    MatMuls alone (test_with_model checks the cosine to the float embeddings).

    Weights use 7 of their 8 bits (``reduce_range``): on CPUs without VNNI, ONNX
    Runtime's uint8-by-int8 kernel adds pairs of products in 16 bits, which full-range
    weights can overflow, so the same file would give different vectors on different
    CPUs and a bank built on one machine would not match a gateway on another. With 7
    bits no such sum overflows on any CPU.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        float_model,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        # Shape inference cannot type the outputs of MiniLM's fused attention MatMuls.
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )
    onnx.save(quantise_per_token(onnx.load(target)), target)


def quantise_per_token(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite, in place, a model from ``quantize_dynamic`` to per-token activation scales."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    row_scales: dict[str, str] = {}
    after: dict[str, onnx.NodeProto] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            nodes += _row_quantiser(node, row_scales)
        elif node.op_type == "MatMulInteger" and node.input[0] in row_scales:
            nodes.append(node)
            after.update(_row_rescale(node, consumers, row_scales[node.input[0]]))
        else:
            nodes.append(node)
    ordered = []
    for node in nodes:
        ordered.append(node)
        if node.output and node.output[0] in after:
            ordered.append(after.pop(node.output[0]))
    if after:
        raise ValueError(f"dequantising Mul not found after its MatMulInteger: {sorted(after)}")
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in _CONSTANTS.items())
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.checker.check_model(model)
    return model


def _row_quantiser(node: onnx.NodeProto, row_scales: dict[str, str]) -> list[onnx.NodeProto]:
    x = node.input[0]
    quantised, scale, zero_point = node.output
    p = f"{quantised}/per_token"
    row_scales[quantised] = f"{p}/scale"
    return [
        helper.make_node("Abs", [x], [f"{p}/abs"]),
        helper.make_node(
            "ReduceMax", [f"{p}/abs", "per_token_last_axis"], [f"{p}/max"], keepdims=1
        ),
        helper.make_node("Max", [f"{p}/max", "per_token_eps"], [f"{p}/max_eps"]),
        helper.make_node("Div", [f"{p}/max_eps", "per_token_127"], [f"{p}/scale"]),
        helper.make_node("Div", [x, f"{p}/scale"], [f"{p}/scaled"]),
        helper.make_node("Round", [f"{p}/scaled"], [f"{p}/rounded"]),
        helper.make_node("Add", [f"{p}/rounded", "per_token_128"], [f"{p}/shifted"]),
        helper.make_node("Clip", [f"{p}/shifted", "per_token_0", "per_token_255"], [f"{p}/clip"]),
        helper.make_node("Cast", [f"{p}/clip"], [quantised], to=TensorProto.UINT8),
        helper.make_node("Identity", ["per_token_zero_point"], [zero_point]),
        # The old scale output fed only the dequantising Mul with the weight scales; a
        # scale of one leaves that Mul the weights' part, and the row part follows it.
        helper.make_node("Identity", ["per_token_1"], [scale]),
    ]


def _row_rescale(
    matmul: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], row_scale: str
) -> dict[str, onnx.NodeProto]:
    (cast,) = consumers[matmul.output[0]]
    (dequantise,) = consumers[cast.output[0]]
    if cast.op_type != "Cast" or dequantise.op_type != "Mul":
        raise ValueError(f"unexpected pattern after {matmul.name}")
    result = dequantise.output[0]
    dequantise.output[0] = f"{result}/per_weight"
    rescale = helper.make_node(
        "Mul", [dequantise.output[0], row_scale], [result], name=f"{result}/per_token"
    )
    return {dequantise.output[0]: rescale}
