"""The rule table, known once in Rust (``optirs._core.RULES``), against the one Python spec.

The kernels take each rule's state buffers in the order the core's rule table lists them;
``optirs._spec`` declares the same order for both APIs, which hand the buffers over in it.
"""

from __future__ import annotations

from optirs import _core
from optirs._spec import SPECS


def test_every_spec_declares_its_rules_buffers_in_the_cores_order():
    for spec in SPECS.values():
        assert spec.kind in _core.RULES, spec.name
        assert _core.RULES[spec.kind] == spec.buffers, spec.name


def test_every_spec_declares_its_rules_scalar_state_in_the_cores_order():
    for spec in SPECS.values():
        assert _core.RULE_SCALARS[spec.kind] == spec.scalar_names, spec.name
    assert set(_core.RULE_SCALARS) == set(_core.RULES)


def test_every_rule_of_the_core_has_a_spec():
    assert set(_core.RULES) == {spec.kind for spec in SPECS.values()}
    assert all(isinstance(b, tuple) for b in _core.RULES.values())
