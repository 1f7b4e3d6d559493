"""Real model architectures that need no download: the ``onnx`` package's light models, given weights.

The ``onnx`` package ships SqueezeNet, ResNet-50, ShuffleNet and others under
``onnx/backend/test/data/light/`` with their weights replaced by ``ConstantOfShape`` nodes, so every
output is the same whatever the input. :func:`light_model` puts seeded random weights back (He-normal
for convolutions and matrices), which gives the real architecture with input-dependent outputs: good
for checking that a remote run computes what a local one does.

Needs ``onnx`` and ``numpy`` (the ``onnx`` extra).
"""

from __future__ import annotations

import math
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
    """The light model ``name`` with seeded random weights, as an ``onnx.ModelProto`` (IR version 8).

    Each weight is drawn for what it does (seen through ``Unsqueeze``/``Reshape`` to the node that uses
    it): convolution and matrix weights He-normal, biases small; batch-norm scales (and the ``Mul``
    scales of models that spell batch norm out) in 0.8..1.2, shifts small. A batch norm's mean and
    (positive) variance are those its input would have: the input's mean square, carried through the
    graph from unit inputs (:func:`_batch_norm_statistics`), so that activations neither vanish nor
    overflow. Every model gives finite outputs that depend on its input (tested for all of
    :data:`LIGHT_MODELS`).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(light_model_path(name)))
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    weight_names = set(init)
    users: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, value in enumerate(node.input):
            users.setdefault(value, []).append((node, index))
    rng = np.random.default_rng(seed)
    kept_nodes = []
    weights: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in init:
            kept_nodes.append(node)
            continue
        shape = [int(d) for d in numpy_helper.to_array(init[node.input[0]]).reshape(-1)]
        weights[node.output[0]] = _weights(_role(node.output[0], users), shape, rng)
    real_inputs = [i for i in graph.input if i.name not in weight_names]
    given = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    _batch_norm_statistics(kept_nodes, [i.name for i in real_inputs], given, weights, rng)
    used = {i for node in kept_nodes for i in node.input}
    del graph.node[:]
    graph.node.extend(kept_nodes)
    remaining = [t for t in graph.initializer if t.name in used and t.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(remaining + [numpy_helper.from_array(w, name) for name, w in weights.items()])
    # Old models (IR 3) list their weights as graph inputs too; IR >= 4 does not need that: keep the real
    # inputs only, and say IR 8 (onnxruntime reads up to 9 at the time of writing).
    del graph.input[:]
    graph.input.extend(real_inputs)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _role(value: str, users: dict[str, list[tuple[Any, int]]]) -> str:
    """What weight ``value`` is, from the first node that uses it (looking through reshapes)."""
    node, index = users[value][0]
    while node.op_type in ("Unsqueeze", "Reshape") and index == 0 and node.output[0] in users:
        node, index = users[node.output[0]][0]
    if node.op_type == "BatchNormalization":
        return "batch norm"  # drawn by _batch_norm_statistics
    return {"Mul": "scale", "Add": "shift"}.get(node.op_type, "weight")


def _weights(role: str, shape: list[int], rng: Any) -> Any:
    """Seeded float32 weights of ``shape`` for ``role`` (see :func:`light_model`)."""
    import numpy as np

    if role == "scale":
        return rng.uniform(0.8, 1.2, shape).astype(np.float32)
    if role in ("shift", "batch norm"):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
    scale = np.sqrt(2.0 / fan_in) if fan_in else 0.01  # He-normal for weights; biases small
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def _batch_norm_statistics(
    nodes: list[Any], inputs: list[str], given: dict[str, Any], weights: dict[str, Any], rng: Any
) -> None:
    """Draw every batch norm's parameters into ``weights`` (replacing any the model's initializers,
    ``given``, hold): scale and shift as :func:`_weights` does, mean and variance those its input would
    have. Those are carried through ``nodes`` (in topological order) as a mean and a mean square per
    tensor, from standard normal ``inputs``: a convolution or matrix with He weights has mean 0 and
    doubles the mean square, ReLU takes those of a rectified normal, a batch norm resets them, sums and
    constant scales and shifts combine them as independent values do, concatenations average, the rest
    keep them. Without it, batch norms that do not normalize let activations grow until softmax saturates.
    """
    import numpy as np

    moments = dict.fromkeys(inputs, (0.0, 1.0))  # activation -> (mean, mean square)
    const = {**given, **weights}  # weights, and reshaped weights
    for node in nodes:
        moved = [moments[i] for i in node.input if i in moments]
        fixed = [const[i] for i in node.input if i in const]
        mean, square = moved[0] if moved else (0.0, 1.0)
        op = node.op_type
        if op in ("Unsqueeze", "Reshape") and node.input[0] in const:
            const[node.output[0]] = const[node.input[0]]
            continue
        if op in ("Conv", "Gemm"):
            mean, square = 0.0, 2 * square
        elif op == "Relu":
            mean, square = _rectified(mean, square)
        elif op == "BatchNormalization":
            scale, shift, mean_name, variance = node.input[1:5]
            channels = const[variance].shape
            weights[scale] = _weights("scale", channels, rng)
            weights[shift] = _weights("shift", channels, rng)
            spread = max(square - mean * mean, 1e-6)
            weights[mean_name] = (mean + rng.standard_normal(channels) * 0.1 * np.sqrt(spread)).astype(np.float32)
            weights[variance] = (spread * rng.uniform(0.8, 1.25, channels)).astype(np.float32)
            mean = float(np.mean(weights[shift]))
            square = float(np.mean(np.square(weights[scale])) + np.mean(np.square(weights[shift])))
        elif op == "Mul" and fixed:
            mean, square = mean * float(np.mean(fixed[0])), square * float(np.mean(np.square(fixed[0])))
        elif op in ("Add", "Sum"):
            terms = moved + [(float(np.mean(c)), float(np.mean(np.square(c)))) for c in fixed]
            mean = sum(m for m, _ in terms)
            square = sum(q for _, q in terms) + mean * mean - sum(m * m for m, _ in terms)
        elif op == "Concat":
            mean, square = (sum(v) / len(moved) for v in zip(*moved, strict=True))
        moments.update(dict.fromkeys(node.output, (mean, square)))


def _rectified(mean: float, square: float) -> tuple[float, float]:
    """Mean and mean square of ``max(x, 0)`` for a normal ``x`` with this mean and mean square."""
    sigma = math.sqrt(max(square - mean * mean, 1e-12))
    z = mean / sigma
    cdf, pdf = 0.5 * (1 + math.erf(z / math.sqrt(2))), math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return mean * cdf + sigma * pdf, square * cdf + mean * sigma * pdf
