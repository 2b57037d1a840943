"""Recompute every node's example value after a rewrite (local shapes for the next axis).

Reads: the graph and fake copies of the example inputs. Writes: ``node.meta["val"]`` and
``node.meta["example_value"]`` on every node.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def refresh_meta(gm: fx.GraphModule, example_inputs: Sequence[object]) -> None:
    """Run ``gm`` on fake tensors and store each node's result in its meta."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
