"""Helper for tests: a parallel run in which one rank dies mid-way (torchrun must end the job)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dits import make  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    model, inputs = make("dit")
    compiled = torch.compile(model, backend="xdit", options={"ulysses_degree": dist.get_world_size(), "inner": "eager"})
    with torch.no_grad():
        compiled(**inputs)
        if dist.get_rank() == 1:
            raise SystemExit("rank 1 dies on purpose")
        for _ in range(3):
            compiled(**inputs)  # rank 0 now waits in a collective its peer never joins
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
