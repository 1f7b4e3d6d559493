"""Real model architectures that need no download: the ``onnx`` package's light models, given weights.

The ``onnx`` package ships SqueezeNet, ResNet-50, ShuffleNet and others under
``onnx/backend/test/data/light/`` with their weights replaced by ``ConstantOfShape`` nodes, so every
output is the same whatever the input. :func:`light_model` puts seeded random weights back (He-normal
for convolutions and matrices), which gives the real architecture with input-dependent outputs: good
for checking that a remote run computes what a local one does.

Needs ``onnx`` and ``numpy`` (the ``onnx`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["LIGHT_MODELS", "light_model", "light_model_path"]

LIGHT_MODELS = (
    "squeezenet",
    "resnet50",
    "shufflenet",
    "inception_v1",
    "inception_v2",
    "densenet121",
    "bvlc_alexnet",
    "zfnet512",
    "vgg19",
)


def light_model_path(name: str) -> Path:
    """Where the ``onnx`` package keeps ``light_<name>.onnx``."""
    import onnx

    if name not in LIGHT_MODELS:
        raise ValueError(f"unknown light model {name!r}; choose from {', '.join(LIGHT_MODELS)}")
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def light_model(name: str = "squeezenet", seed: int = 0) -> Any:
    """The light model ``name`` with seeded random weights, as an ``onnx.ModelProto`` (IR version 8)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(light_model_path(name)))
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    weight_names = set(init)
    rng = np.random.default_rng(seed)
    kept_nodes = []
    new_inits = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in init:
            kept_nodes.append(node)
            continue
        shape = [int(d) for d in numpy_helper.to_array(init[node.input[0]]).reshape(-1)]
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = np.sqrt(2.0 / fan_in) if len(shape) > 1 else 0.01
        weights = (rng.standard_normal(shape) * scale).astype(np.float32)
        new_inits.append(numpy_helper.from_array(weights, node.output[0]))
    used = {i for node in kept_nodes for i in node.input}
    del graph.node[:]
    graph.node.extend(kept_nodes)
    remaining = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(remaining + new_inits)
    # Old models (IR 3) list their weights as graph inputs too; IR >= 4 does not need that: keep the real
    # inputs only, and say IR 8 (onnxruntime reads up to 9 at the time of writing).
    real_inputs = [i for i in graph.input if i.name not in weight_names]
    del graph.input[:]
    graph.input.extend(real_inputs)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
