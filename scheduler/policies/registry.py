"""The one list of call-ordering policies: config, CLI, bench and metrics take names here.

| name | file | order |
|---|---|---|
| `fcfs` | `fcfs.py` | call arrival (what engines do) |
| `mlfq` | `mlfq.py` | plain MLFQ: a call's own service |
| `plas` | `plas.py` | program-level attained service, MLFQ-discretised |
| `atlas` | `atlas.py` | attained service along the critical path, MLFQ-discretised |
| `dlpm` | `dlpm.py` | longest cached prefix, deficit round robin across tenants |

Shared pieces: the MLFQ discretisation (`mlfq.py`), anti-starvation
(`anti_starvation.py`), the engine rank (`engine_rank.py`).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from .atlas import ATLASPolicy
from .dlpm import DLPMPolicy
from .fcfs import FCFSPolicy
from .mlfq import LeveledPolicy, MLFQPolicy
from .plas import PLASPolicy

if TYPE_CHECKING:
    from ..config import SchedulerConfig
    from .protocol import Policy, PrefixHints

# Each name is spelled once, as its class's `name`; everything else reads it from here.
POLICIES = MappingProxyType({
    cls.name: cls for cls in (FCFSPolicy, MLFQPolicy, PLASPolicy, ATLASPolicy, DLPMPolicy)
})
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
DEFAULT_POLICY = ATLASPolicy.name
# What engines do by themselves: the reference the bench compares every policy with.
BASELINE_POLICY = FCFSPolicy.name
# Ranked by their programs' history (Autellix's policies): the bench compares them to fcfs.
PROGRAM_AWARE_POLICIES: tuple[str, ...] = (PLASPolicy.name, ATLASPolicy.name)


def make_policy(config: SchedulerConfig, hints: PrefixHints | None = None) -> Policy:
    """The configured policy. One that ranks by cached prefix gets `hints` (the router),
    which then keeps its prefix trees for it."""
    cls = POLICIES[config.policy]
    if cls.wants_prefix_hint:
        if hints is not None:
            hints.track_prefixes()
        return cls(config, hints)  # type: ignore[call-arg]
    return cls(config)  # type: ignore[call-arg]


def policy_levels(config: SchedulerConfig) -> int:
    """Queue levels the configured policy ranks calls into (metrics label depths by it)."""
    return config.mlfq_queues if issubclass(POLICIES[config.policy], LeveledPolicy) else 1
