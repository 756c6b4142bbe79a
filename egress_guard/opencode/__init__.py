"""OpenCode integration: read opencode.json, derive a policy from it, diagnose a setup.

``config``     reads opencode.json / opencode.jsonc (JSONC, ``{env:}``/``{file:}`` left
               unresolved) and works out what the configuration makes OpenCode contact.
``policygen``  ``egress-guard policy from-opencode``: that list as a version-1 policy
               (``policygen_draft`` writes the file).
``doctor``     ``egress-guard doctor``: settings and environment that defeat the guard
               (with ``doctor_env``, ``doctor_values`` and ``doctor_report``).
"""

from egress_guard.opencode.config import OpenCodeConfig, load_config
from egress_guard.opencode.jsonc import ConfigError, Placeholder, parse_jsonc

__all__ = ["ConfigError", "OpenCodeConfig", "Placeholder", "load_config", "parse_jsonc"]
