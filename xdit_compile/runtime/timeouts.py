"""A collective that outlived its group's timeout, named: rank, collective, group and graph node.

gloo's bare "Timed out waiting 20000ms for recv operation" says none of that. ``name_timeout``
reads it off the traceback (the runtime function holding the ``group``, the fx frame under
``inner="eager"``, inductor's generated code under ``"inductor"``), so the compiled program
runs unchanged.
"""

from __future__ import annotations

import linecache
import re
from types import FrameType, TracebackType
from typing import Any, Iterator

import torch.distributed.distributed_c10d as c10d

from .. import plan as plan_mod
from ..errors import CollectiveTimeoutError
from ..plan import ParallelPlan

# The guard modules hold ``group`` locals of their own; the collective that timed out is elsewhere.
_GUARDS = ("agreement.py", "input_check.py", "timeouts.py")

TIMEOUT_TEXT = re.compile(r"timed out|timeout", re.IGNORECASE)
_COLLECTIVE_CALL = re.compile(r"_c10d_functional\.(\w+)\.default\((.*)\)")
_SOURCE_NODES = re.compile(r"#\s*(?:Topologically Sorted )?Source Nodes?: \[([^\]]*)\]")
_FX_ASSIGN = re.compile(r"^\s*(\w+) = ")


def name_timeout(error: BaseException, plan: ParallelPlan, graph: str, rank: int) -> CollectiveTimeoutError | None:
    """A ``CollectiveTimeoutError`` naming what ``error`` (a raw backend timeout) waited for; else None."""
    text = str(error)
    if not TIMEOUT_TEXT.search(text):
        return None
    frames = list(_frames(error.__traceback__))
    kind, group, node = _from_runtime(frames)
    if kind is None:
        kind, group, node = _from_inductor(frames)
    if node is None:
        node = _from_fx(frames)
    where = f"graph node {node!r} of {graph}" if node else f"{graph} (graph node not found in the traceback)"
    if group is not None:
        ranks = plan_mod.group_ranks(group)
        axis = _axis_of(plan, group)
        peers = f"the {axis} group, ranks {ranks}" if axis else f"ranks {ranks}"
    else:
        peers = "a group of plan " + plan.describe()
    waited = f"{plan.timeout:g} s" if plan.timeout is not None else "the default group's timeout"
    return CollectiveTimeoutError(
        f"xdit: rank {rank} timed out after {waited} in {kind or 'a collective'} over {peers}, at {where} (plan "
        f"{plan.describe()}): a rank of that group is stuck, died, or called the model differently; its own "
        "traceback shows where it is. Raise the option timeout if a rank legitimately needs longer (a first "
        f"compile). The backend said: {text.strip().splitlines()[0][:300]}"
    )


def _frames(tb: TracebackType | None) -> Iterator[tuple[FrameType, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


# Runtime functions that issue a collective inline, named by the collective they issue.
_ISSUES = {"scatter_heads": "all_to_all", "gather_heads": "all_to_all", "_pooled_all_to_all": "all_to_all"}


def _from_runtime(frames: list[tuple[FrameType, int]]) -> tuple[str | None, Any, str | None]:
    """The innermost runtime function that holds a ``group`` (its name is the collective's)."""
    for frame, _ in reversed(frames):
        code, path = frame.f_code, frame.f_code.co_filename.replace("\\", "/")
        if "xdit_compile/runtime/" in path and not path.endswith(_GUARDS) and "group" in frame.f_locals:
            return _ISSUES.get(code.co_name, code.co_name), frame.f_locals["group"], None
    return None, None, None


def _from_fx(frames: list[tuple[FrameType, int]]) -> str | None:
    """The node an fx ``GraphModule`` frame was running (its generated line assigns the node's name)."""
    for frame, line in reversed(frames):
        if frame.f_code.co_filename.startswith("<eval_with_key>"):
            m = _FX_ASSIGN.match(linecache.getline(frame.f_code.co_filename, line))
            if m:
                return m.group(1)
    return None


def _from_inductor(frames: list[tuple[FrameType, int]]) -> tuple[str | None, Any, str | None]:
    """The collective and source nodes of inductor's generated code around the failing line."""
    for frame, line in reversed(frames):
        path = frame.f_code.co_filename
        if "torchinductor" not in path and "async_compile" not in frame.f_globals:
            continue
        lines = linecache.getlines(path)
        kind = group = node = None
        waited = re.search(r"wait_tensor\.default\((\w+)\)", lines[line - 1]) if line <= len(lines) else None
        for text in reversed(lines[:line]):
            call = _COLLECTIVE_CALL.search(text)
            if kind is None and call and call.group(1) != "wait_tensor" and (
                    waited is None or text.strip().startswith(f"{waited.group(1)} =")):
                kind = call.group(1)
                names = re.findall(r"'([^']+)'", call.group(2))
                group = next((n for n in reversed(names) if _is_group(n)), None)
            src = _SOURCE_NODES.search(text)
            if src and node is None:
                node = src.group(1)
            if kind is not None and node is not None:
                break
        return kind, group, node
    return None, None, None


def _is_group(name: str) -> bool:
    try:
        c10d._resolve_process_group(name)
        return True
    except Exception:  # noqa: BLE001 - not a group name
        return False


def _axis_of(plan: ParallelPlan, group: Any) -> str | None:
    name = group if isinstance(group, str) else getattr(group, "group_name", None)
    try:
        groups = plan_mod.process_groups(plan)
    except Exception:  # noqa: BLE001 - only for the message
        return None
    return next((axis for axis, g in groups.items() if getattr(g, "group_name", None) == name), None)
