"""Which device a buffer the runtime creates lives on: the inputs' device, or the group's.

Buffers outside the compiled graphs (PipeFusion's receive and broadcast buffers, its example inputs,
the ranks' agreement digests) have no tensor to inherit a device from by ``*_like``. They take it from
the tensors they travel with (``device_of``), or, for host bookkeeping sent through a collective, from
the process group's backend (``collective_device``): gloo takes CPU tensors, nccl (and the other
accelerator backends) takes tensors on this rank's current accelerator.

``tests/test_devices.py`` scans the package for tensor factories called without ``device=``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

CPU = torch.device("cpu")


def collective_device(group: Any = None) -> torch.device:
    """The device whose tensors ``group``'s backend moves: CPU for gloo, else the current accelerator."""
    if not (dist.is_available() and dist.is_initialized()):
        return CPU
    backend = str(dist.get_backend(group)).lower()
    # "cpu:gloo,cuda:nccl" takes both; CPU keeps host bookkeeping off the accelerator.
    if "gloo" in backend or not torch.accelerator.is_available():
        return CPU
    acc = torch.accelerator.current_accelerator()
    assert acc is not None  # is_available() said yes
    return torch.device(acc.type, torch.accelerator.current_device_index())


def device_of(values: Iterable[Any], group: Any = None) -> torch.device:
    """The device of the first tensor among ``values``; the group's device when there is none."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return collective_device(group)
