"""Every rule of the table validated against the full computation, in one process (no spawn).

The validator (``xdit_compile.testing.validate_rules``) runs each op's samples under every
placement its rule accepts on simulated ranks; here with 6 placement combinations per
sample to stay fast (the command line runs 16). A rule added to ``RULES`` without samples
in ``rule_samples`` (or a reason in ``EXEMPT``) fails ``test_every_rule_is_validated``.
"""

from __future__ import annotations

import torch

from xdit_compile.rules.table import RULES
from xdit_compile.testing.rule_samples import In, Sample, samples_for
from xdit_compile.testing.sim_ranks import SimWorld
from xdit_compile.testing.validate_rules import EXEMPT, run_case, validate_rules
from xdit_compile.placements import PARTIAL, Shard


def test_every_rule_is_validated() -> None:
    report = validate_rules(max_combos=6)
    assert set(report.ops) == set(RULES)
    assert not report.wrong, report.text()
    assert not report.never_exercised, report.text()
    assert set(EXEMPT) <= set(RULES), f"exempt names no rule has: {sorted(set(EXEMPT) - set(RULES))}"
    # The spellings of issue 9, each exercised under a shard or a partial sum and right.
    assert report.ops["flip"].exercised and report.ops["to"].exercised and report.ops["div"].exercised


def test_every_name_has_samples_or_a_reason() -> None:
    missing = [name for name in RULES if name not in EXEMPT and not samples_for(name, 2)]
    assert not missing, f"rules without samples in xdit_compile/testing/rule_samples.py: {missing}"


def _impostor(name: str, fn):
    fn.__name__ = name  # graphs name call_function nodes by __name__: the rule of `name` applies
    return fn


def test_validator_catches_wrong_rules() -> None:
    """Ops that break what their rule assumes (named like a rule's op) are reported wrong."""
    x = torch.randn(2, 7, 6)
    not_linear = _impostor("neg", lambda t: -t + 1)  # the "neg" rule lets a Partial through
    reversed_all = _impostor("flip", lambda t, dims: t.flip(0, 1, 2))  # the rule reads dims only
    with SimWorld(2) as world:
        res, exercised = run_case(Sample("neg", not_linear, (In(0),), (x,)), (PARTIAL,), world)
        assert exercised and res.status == "wrong", res
        res, exercised = run_case(Sample("flip", reversed_all, (In(0), [2]), (x,)), (Shard(1, (7,), 1),), world)
        assert exercised and res.status == "wrong", res
        res, exercised = run_case(Sample("flip", "flip", (In(0), 2, 1), (x,)), (Shard(1, (7,), 1),), world)
        assert res.status == "replicated", res  # dims as separate arguments: the fixed rule gathers
