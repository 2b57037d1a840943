"""Recompute every node's example value after a rewrite (local shapes for the next axis).

Reads: the graph and the example inputs (real tensors, ints). Writes: ``node.meta["val"]`` and
``node.meta["example_value"]`` on every node; drops ``node.meta["unbacked_bindings"]``.

Every input size is static (``static_shapes=True``), so every size computed from the inputs is
a plain int: this is also how ``specialize.py`` fixes a symbolic graph to one concrete shape.
Sizes that depend on data (``nonzero``, boolean masks) come out as unbacked ``SymInt``s of a
fresh ``ShapeEnv``, as Dynamo's own example values have them, instead of failing (the backend
splits such a graph at those values before the passes: ``dynamic_values.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def refresh_meta(gm: fx.GraphModule, example_inputs: Sequence[object]) -> None:
    """Run ``gm`` on fake tensors and store each node's result in its meta."""
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    for node in gm.graph.nodes:
        # Bindings of Dynamo's unbacked symbols (u0 = nonzero's length) name another ShapeEnv's
        # symbols; the fresh one makes its own.
        node.meta.pop("unbacked_bindings", None)
    fakes = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
