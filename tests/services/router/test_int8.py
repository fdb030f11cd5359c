"""Per-token int8 activations on a small model (the MiniLM one is in test_with_model)."""

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from routemesh.services.router.int8 import quantise

K, N = 32, 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A float two-layer model, its dynamic int8 copy, and that copy made per token."""
    rng = np.random.default_rng(7)
    first = numpy_helper.from_array(rng.normal(size=(K, K)).astype(np.float32), "w1")
    second = numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "w2")
    bias = numpy_helper.from_array(rng.normal(size=(N,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [first, second, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder = tmp_path_factory.mktemp("int8")
    paths = {name: folder / f"{name}.onnx" for name in ("float", "dynamic", "per_token")}
    onnx.save(model, paths["float"])
    quantize_dynamic(
        paths["float"],
        paths["dynamic"],
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
    )
    quantise(paths["float"], paths["per_token"])
    return paths


def _run(path, x, optimise=True):
    options = onnxruntime.SessionOptions()
    if not optimise:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _inputs():
    rng = np.random.default_rng(11)
    row = rng.normal(size=(1, 4, K)).astype(np.float32)
    loud = 50 * rng.normal(size=(1, 4, K)).astype(np.float32)
    return row, np.concatenate([row, loud])


def test_a_row_quantises_the_same_whatever_shares_its_run(models):
    row, batch = _inputs()
    alone = _run(models["per_token"], row)
    assert np.array_equal(_run(models["per_token"], batch)[:1], alone)


def test_the_dynamic_model_it_starts_from_does_depend_on_the_run(models):
    row, batch = _inputs()
    alone = _run(models["dynamic"], row)
    assert not np.allclose(_run(models["dynamic"], batch)[:1], alone, atol=1e-3)


def test_per_token_stays_close_to_float(models):
    row, _ = _inputs()
    exact, quantised = _run(models["float"], row), _run(models["per_token"], row)
    np.testing.assert_allclose(quantised, exact, atol=0.05 * np.abs(exact).max())


def test_onnx_runtime_fusions_keep_the_row_scales(models):
    """MatMulIntegerToFloat reads one scale for its input: the rows must stay outside it."""
    _, batch = _inputs()
    np.testing.assert_allclose(
        _run(models["per_token"], batch),
        _run(models["per_token"], batch, optimise=False),
        rtol=1e-5,
        atol=1e-4,
    )
