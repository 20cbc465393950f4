"""Call-ordering policies: the `Policy` contract (`protocol.py`), one file per algorithm,
and the registry of names (`registry.py`)."""

from .protocol import Policy, PrefixHints
from .registry import (
    BASELINE_POLICY,
    DEFAULT_POLICY,
    POLICY_NAMES,
    PROGRAM_AWARE_POLICIES,
    make_policy,
    policy_levels,
)

__all__ = ["BASELINE_POLICY", "DEFAULT_POLICY", "POLICY_NAMES", "PROGRAM_AWARE_POLICIES", "Policy",
           "PrefixHints", "make_policy", "policy_levels"]
