"""Load-time graph rewrites (models/graph.py) change the speed, never a single output bit."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import graph

pytestmark = pytest.mark.timeout(120)


def _ops(payload: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_model_from_string(payload).graph.node]


def _run(payload: bytes, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_monai_unet_prelu_becomes_leaky_relu_with_identical_outputs():
    torch = pytest.importorskip("torch")
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                    num_res_units=2).eval()
    with torch.no_grad():
        for m in net.modules():  # learnt slopes differ from the 0.25 they start at
            if isinstance(m, torch.nn.PReLU):
                m.weight.fill_(float(torch.rand(1)) * 0.5)
    buf = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 1, 32, 32, 32), buf, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "n", 2: "d", 3: "h", 4: "w"}, "y": {0: "n", 2: "d", 3: "h", 4: "w"}})
    original = buf.getvalue()
    rewritten = graph.optimise(original)
    assert _ops(original).count("PRelu") > 4
    assert "PRelu" not in _ops(rewritten)
    assert _ops(rewritten).count("LeakyRelu") == _ops(original).count("PRelu")
    x = np.random.default_rng(1).normal(size=(2, 1, 32, 40, 24)).astype(np.float32)
    np.testing.assert_array_equal(_run(rewritten, x), _run(original, x))
    np.testing.assert_allclose(_run(original, x), net(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def test_per_channel_slopes_and_graphs_without_prelu_are_left_alone():
    slope = numpy_helper.from_array(np.array([0.1, 0.2], np.float32).reshape(2, 1, 1), "slope")
    g = helper.make_graph([helper.make_node("PRelu", ["x", "slope"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], [slope])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    payload = m.SerializeToString()
    assert graph.optimise(payload) is payload
    assert graph.optimise(b"not onnx") == b"not onnx"
