"""Exact rewrites of a model's graph, made in memory before ONNX Runtime loads it.

Only rewrites that give bit-identical outputs belong here; the stored model object and its
SHA-256 are never touched (the payload is verified first, then rewritten for the session).

PRelu with one constant slope -> LeakyRelu(alpha=slope)
    MONAI's networks use ``nn.PReLU()`` (one learnt slope) after every normalisation. ONNX
    Runtime runs PRelu as a broadcasting binary operator; LeakyRelu is a vectorised activation
    of its own. Same arithmetic (``x if x >= 0 else slope * x`` in float32), and on a MONAI
    3D U-Net the PRelu nodes went from a fifth of the run time to a few percent
    (docs/BENCHMARKS.md). The TorchScript exporter shares one slope initializer between
    nodes whose values are equal and reaches it through Identity nodes; both are followed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)


def _constant(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or a Constant, seen through Identity nodes."""
    for _ in range(16):  # an Identity chain is short; a cycle cannot occur in a valid graph
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            name = node.input[0]
            continue
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None
    return None


def prelu_to_leaky_relu(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every PRelu whose slope is one constant value; returns how many."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    count = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx"):
            continue
        slope = _constant(node.input[1], inits, producers)
        if slope is None or slope.size != 1 or slope.dtype != np.float32:
            continue
        graph.node[i].CopyFrom(helper.make_node("LeakyRelu", [node.input[0]], list(node.output),
                                                name=node.name, alpha=float(slope.reshape(-1)[0])))
        count += 1
    return count


def optimise(payload: bytes) -> bytes:
    """``payload`` with the rewrites above applied (unchanged, and not re-serialised, if none
    applies). Graphs whose weights live in external files are left alone."""
    try:
        model = onnx.load_model_from_string(payload)
    except Exception:  # not for us to judge: ONNX Runtime will say what is wrong with it
        return payload
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return payload
    n = prelu_to_leaky_relu(model)
    if not n:
        return payload
    log.debug("graph: %d PRelu node(s) with a constant slope run as LeakyRelu", n)
    return model.SerializeToString()
