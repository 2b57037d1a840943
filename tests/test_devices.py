"""The GPU path on a CPU machine: no buffer of the package is created without an explicit device.

Under nccl every tensor a collective or a point-to-point transfer touches must be on the rank's GPU,
and every example input an inner compiler sees must be where the real inputs are. A factory call
(``torch.zeros(...)`` and friends) without ``device=`` makes a CPU tensor whatever the inputs are, so
the package may hold only the few listed in ``ALLOWED``, each with its reason. ``*_like`` and
``x.new_*`` inherit their device and are fine.
Then the places that take the device from their inputs are run with tensors on the "meta" device.
"""

from __future__ import annotations

import ast
import pathlib

import torch

from xdit_compile.pipefusion.split import StageGraph
from xdit_compile.runtime.devices import CPU, collective_device, device_of
from xdit_compile.runtime.guard import _mixer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "xdit_compile"
FACTORIES = {"empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "linspace",
             "eye", "as_tensor", "empty_strided", "scalar_tensor"}
SKIPPED_DIRS = {"testing": "test helpers (rule samples, CPU kernel stand-ins, the gloo harness) run on CPU by design"}

# (path relative to xdit_compile/, enclosing function, factory) -> why a CPU tensor is right there.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("pipefusion/stream.py", "walk", "arange"): "host bookkeeping: the global row ids a patch reads (compile time)",
    ("pipefusion/stream.py", "_rows_written", "zeros"): "host bookkeeping: row ids of a leaf that is not gathered",
    ("pipefusion/stream.py", "_rows_written", "arange"): "host bookkeeping: the row ids each patch writes",
    ("passes/attention_kernels.py", "_uniform_length", "arange"): "compared with a .cpu() copy of graph constants",
}


def _calls_without_device() -> list[tuple[str, str, str, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.split("/")[0] in SKIPPED_DIRS:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]:
            name = getattr(func, "name", "<module>")
            body = func.body if isinstance(func, ast.Module) else [func]
            for stmt in body:
                for node in ast.walk(stmt):
                    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                            and node.func.value.id == "torch"):
                        continue
                    if any(k.arg in ("device", None) for k in node.keywords):  # None: **kwargs passes one on
                        continue
                    found.append((rel, name, node.func.attr, node.lineno))
    # A call inside a nested function is found once per enclosing function; keep the innermost.
    innermost: dict[tuple[str, int, str], tuple[str, str, str, int]] = {}
    for rel, name, attr, line in found:
        innermost.setdefault((rel, line, attr), (rel, name, attr, line))
        if name != "<module>":
            innermost[(rel, line, attr)] = (rel, name, attr, line)
    return sorted(innermost.values(), key=lambda f: (f[0], f[3]))


def test_no_buffer_without_a_device() -> None:
    found = _calls_without_device()
    bad = [f"xdit_compile/{rel}:{line} torch.{attr}(...) in {name}()" for rel, name, attr, line in found
           if (rel, name, attr) not in ALLOWED]
    assert not bad, (
        "tensor factories without device= (a CPU tensor even when the inputs are on a GPU, which nccl "
        "and a CUDA graph cannot use). Pass device= (the inputs' device, or "
        "xdit_compile.runtime.devices.collective_device() for what a collective sends), or add an ALLOWED "
        "entry with the reason:\n  " + "\n  ".join(bad))
    stale = sorted(set(ALLOWED) - {(rel, name, attr) for rel, name, attr, _ in found})
    assert not stale, f"ALLOWED entries that match no call any more (remove them): {stale}"


def test_buffers_follow_the_inputs_device() -> None:
    meta = torch.device("meta")
    x = torch.empty(2, 3, device=meta)
    assert device_of([1, "a", x]) == meta
    assert device_of([]) == CPU  # no process group: CPU
    assert collective_device() == CPU
    stage = StageGraph(gm=None, inputs=[1], recv=[((2, 4), torch.float16)], send=[], recv_names=["r"],  # type: ignore[arg-type]
                       send_names=[])
    ex = stage.example_inputs([3, x])
    assert ex[0] is x and ex[1].device == meta and ex[1].shape == (2, 4) and ex[1].dtype == torch.float16
    assert _mixer([2, 3], meta).device == meta
