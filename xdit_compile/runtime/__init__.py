"""Runtime pieces the compiled graphs call: traceable collectives and sequence-parallel attention."""

from xdit_compile.runtime.attention import (
    AttentionError,
    attention_with_lse,
    merge_attention,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from xdit_compile.runtime.collectives import (
    CollectiveRecord,
    Group,
    all_gather,
    all_reduce,
    all_to_all,
    group_rank,
    group_size,
    record_collectives,
    shift,
)

__all__ = [
    "AttentionError",
    "CollectiveRecord",
    "Group",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "attention_with_lse",
    "group_rank",
    "group_size",
    "merge_attention",
    "record_collectives",
    "ring_attention",
    "shift",
    "ulysses_attention",
    "usp_attention",
]
