"""Policy files: the language (model), its YAML loading with file:line errors, the catalog."""

from egress_guard.policy.errors import PolicyError
from egress_guard.policy.loader import (
    EffectivePolicy,
    load_catalog,
    load_policy,
    load_policy_text,
    load_preset,
    policies_dir,
    preset_names,
)
from egress_guard.policy.model import CatalogEntry, Destination

__all__ = [
    "CatalogEntry",
    "Destination",
    "EffectivePolicy",
    "PolicyError",
    "load_catalog",
    "load_policy",
    "load_policy_text",
    "load_preset",
    "policies_dir",
    "preset_names",
]
