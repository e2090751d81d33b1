"""Small, real ONNX graphs built with onnx.helper for tests (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def segmentation_model(classes: int = 2, channels: int = 1, weight_elems: int = 0, seed: int = 0) -> bytes:
    """A 1x1 convolution followed by a sigmoid: [N, C, H, W] -> [N, K, H, W] probabilities.

    ``weight_elems`` adds an unused-by-shape but real initializer (folded into the bias path) so
    tests can build models of any size without changing the graph's signature.
    """
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((classes, channels, 1, 1)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["probabilities"])]
    inits = [w, b]
    if weight_elems:
        big = numpy_helper.from_array(rng.standard_normal(weight_elems).astype(np.float32), "ballast")
        inits.append(big)
        # ReduceSum(ballast) * 0 added to the logits keeps the ballast in the graph for real.
        zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
        inits.append(zero)
        nodes = [helper.make_node("ReduceSum", ["ballast"], ["bsum"], keepdims=0),
                 helper.make_node("Mul", ["bsum", "zero"], ["bzero"]),
                 helper.make_node("Conv", ["x", "w", "b"], ["conv"]),
                 helper.make_node("Add", ["conv", "bzero"], ["logits"]),
                 helper.make_node("Sigmoid", ["logits"], ["probabilities"])]
    graph = helper.make_graph(
        nodes, "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelnode-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def classification_model(classes: int = 3, channels: int = 1, size: int = 32) -> bytes:
    """Global average pool + Gemm + softmax: [N, C, size, size] -> [N, K]."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((classes, channels)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "cls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelnode-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def segmentation_model_of_parity(odd: bool, seed: int = 0, weight_elems: int = 0) -> bytes:
    """:func:`segmentation_model` serialized to an odd or an even number of bytes.

    A doc_string of n < 128 bytes adds 2 + n bytes to the model, so an odd n flips the parity;
    the graph and its signature are untouched.
    """
    data = segmentation_model(seed=seed, weight_elems=weight_elems)
    if len(data) % 2 != odd:
        model = onnx.load_model_from_string(data)
        model.doc_string = "padding"
        data = model.SerializeToString()
    assert len(data) % 2 == odd, f"{len(data)} bytes, wanted {'odd' if odd else 'even'}"
    onnx.checker.check_model(data)
    return data


def write_0_1_0_model_object(onnx_path: Path, card: Any, out: Path) -> None:
    """Pack ``onnx_path`` byte for byte as modelnode 0.1.0's ``pack_file`` did.

    0.1.0 gave pydicom the open ONNX file itself as the OB value; pydicom writes such a buffer's
    own length, odd or not, and then a pad byte after the element, which PS3.5 readers refuse.
    Only the payload element's value differs from what ``encode`` builds today.
    """
    from iods import model_object as mo

    with open(onnx_path, "rb") as fh:
        ds = mo.encode(fh, card)
        block = ds.private_block(mo.PRIVATE_GROUP, mo.PRIVATE_CREATOR)
        block[mo.EL_PAYLOAD].value = fh
        mo.write(ds, out)


# Centres, in windowed intensity (window -350/1500: -1100..400 HU -> 0..1), of the classes of
# :func:`intensity_classes_model`: channel 0 air (background), then lung, soft tissue, bone.
INTENSITY_CENTRES = (0.0, 0.17, 0.6, 1.0)


def intensity_classes_model(centres: tuple[float, ...] = INTENSITY_CENTRES, *, spatial: int = 3,
                            shift: bool = False) -> bytes:
    """Logits over exclusive classes by nearest intensity: ``-(x - c_k)^2`` per channel k.

    [N, 1, *spatial] -> [N, len(centres), *spatial], every spatial axis dynamic. The argmax of
    a voxel is the class whose centre is nearest its value, so the truth is computable in
    numpy. With ``shift`` the input is first moved one voxel along the first spatial axis
    (``out[i] = in[i - 1]``), which makes the result depend on how the volume was oriented.
    """
    k = len(centres)
    c = np.asarray(centres, np.float32)
    kernel = (1,) * spatial
    w = numpy_helper.from_array(np.stack([2 * c, -np.ones(k, np.float32)], axis=1).reshape(k, 2, *kernel), "w")
    b = numpy_helper.from_array(-(c * c), "b")
    inits = [w, b]
    nodes = []
    src = "x"
    if shift:
        inits.append(numpy_helper.from_array(np.array([1, 0, 0], np.float32).reshape(1, 1, 3, *(1,) * (spatial - 1)),
                                             "shift_w"))
        pads = [1] + [0] * (spatial - 1)
        nodes.append(helper.make_node("Conv", ["x", "shift_w"], ["shifted"], pads=pads + pads))
        src = "shifted"
    nodes += [helper.make_node("Mul", [src, src], ["sq"]),
              helper.make_node("Concat", [src, "sq"], ["feats"], axis=1),
              helper.make_node("Conv", ["feats", "w", "b"], ["logits"])]
    dims = ["D", "H", "W"][-spatial:] if spatial <= 3 else [f"S{i}" for i in range(spatial)]
    graph = helper.make_graph(
        nodes, "intensity_classes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, *dims])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, *dims])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelnode-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def intensity_classes_truth(windowed: np.ndarray, centres: tuple[float, ...] = INTENSITY_CENTRES) -> np.ndarray:
    """What :func:`intensity_classes_model` labels (without shift), computed in numpy."""
    c = np.asarray(centres, np.float32).reshape((-1,) + (1,) * windowed.ndim)
    return np.argmax(-(windowed[None] - c) ** 2, axis=0).astype(np.uint8)


def pool_concat_model(classes: int = 2) -> bytes:
    """A U-Net's skip connection in miniature: MaxPool(2) -> Resize(x2) -> Concat with the input
    -> 1x1x1 Conv to ``1 + classes`` logits. Dynamic spatial axes, but an odd size fails inside
    ONNX Runtime ("Concat ... mismatched dimensions"), as a real U-Net does without padding."""
    k = 1 + classes
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((k, 2, 1, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("MaxPool", ["x"], ["pooled"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
             helper.make_node("Resize", ["pooled", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Concat", ["x", "up"], ["feats"], axis=1),
             helper.make_node("Conv", ["feats", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "pool_concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, "D", "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelnode-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
