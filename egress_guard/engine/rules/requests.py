"""A request's own rules (stage 4): a destination's methods, paths and models, the shape
of a body held to read its model, and the interception its rules need in a tunnel."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from egress_guard.engine.models import READ_METHODS, NamedModel, api_kind
from egress_guard.engine.paths import AmbiguousPath, canonical_path
from egress_guard.engine.types import Decision, Reason, printable, refusal
from egress_guard.policy.model import Destination


def check_request(
    dest: Destination,
    method: str,
    path: str,
    model: str | Sequence[NamedModel] | None,
    decision: Decision,
    *,
    upgrade: str | None = None,
) -> Decision | None:
    """A destination's method, path and model rules for one request (stage 4).

    ``model`` is None until the body is read (or when the path is not a model call),
    else the model, or every model the request may run (``requested_models``: its
    ``model`` and the fallbacks and server tools it names), each of which must be
    allowed; ``upgrade`` is the request's Upgrade header, if any.
    """

    def refuse(reason: Reason, hint: str, detail: str | None = None) -> Decision:
        return refusal(decision, reason, hint, detail)

    if dest.methods is not None and method not in dest.methods:
        return refuse(
            "method_not_allowed", f"destination {dest.name!r} allows methods {dest.methods}"
        )
    if dest.paths is None and dest.models is None:
        return None
    try:
        bare = canonical_path(path)
    except AmbiguousPath as e:
        return refuse("path_not_allowed", "send the path in its plain spelling", str(e))
    if dest.paths is not None and not any(fnmatchcase(bare, g) for g in dest.paths):
        return refuse("path_not_allowed", f"destination {dest.name!r} allows paths {dest.paths}")
    if dest.models is None:
        return None
    hint = models_hint(dest)
    if upgrade:
        return refuse(
            "model_not_allowed",
            hint,
            f"protocol upgrade ({printable(upgrade)}): its frames cannot be model-checked",
        )
    if model is None and method.upper() not in READ_METHODS and api_kind(bare) is None:
        return refuse(
            "model_not_allowed",
            hint,
            f"{method} to a path that is not a model endpoint egress-guard can read",
        )
    named = [NamedModel(model, "model")] if isinstance(model, str) else model or ()
    for m in named:
        if m.model not in dest.models:
            where = "" if m.field == "model" else f" (named in {m.field})"
            return refuse("model_not_allowed", hint, f"model {m.model!r}{where}")
    return None


def check_model_body(
    dest: Destination,
    decision: Decision,
    method: str,
    content_length: str | None,
    chunked: bool,
    limit: int,
    *,
    http1: bool = True,
) -> Decision | None:
    """Before a model endpoint's body is held whole to read its model (stage 4).

    The proxy would buffer such a body without a limit of its own, so it must
    declare its length up front, and that length must be within ``limit``. Only an
    HTTP/1 request without Content-Length (and not chunked) certainly has no body;
    over HTTP/2 and HTTP/3 any method may send DATA frames of undeclared length.
    """
    if chunked:
        problem = "a body of unknown length (Transfer-Encoding) cannot be checked for its model"
    elif content_length is None:
        if http1 and method.upper() not in ("POST", "PUT", "PATCH"):
            return None
        problem = "a body without Content-Length cannot be checked for its model"
    elif not content_length.isdigit():
        problem = "an invalid Content-Length"
    elif int(content_length) > limit:
        problem = f"a body of {int(content_length)} bytes is larger than --max-model-body ({limit})"
    else:
        return None
    hint = (
        f"{models_hint(dest)}; the body must be sent with a Content-Length within --max-model-body"
    )
    return refusal(decision, "model_not_allowed", hint, problem)


def check_inspection(
    dest: Destination | None, inspecting: bool, decision: Decision
) -> Decision | None:
    """A CONNECT tunnel to a destination with request rules (methods, paths, models)
    can only have them checked when the guard intercepts its TLS. Without
    interception such a tunnel is refused: relayed as bytes, its rules would not be
    checked at all. None when the tunnel may open (no rules, inspection on, or the
    target is refused or let through for another reason already, which then is the
    reason recorded). Plain HTTP requests need no interception and never ask this.
    """
    if dest is None or inspecting or not dest.needs_inspection or decision.action != "allow":
        return None
    rules = ", ".join(request_rules(dest))
    return refusal(
        decision,
        "inspection_required",
        (
            f"destination {dest.name!r} has request rules ({rules}) that are checked only "
            "with TLS interception: run egress-guard with --inspect (mitmdump: --set "
            "egress_guard_inspect=true) and have clients trust its CA, or remove the rules"
        ),
        f"a tunnel to {dest.name!r} would be relayed without its {rules} checked",
    )


def refuse_model(dest: Destination, decision: Decision, detail: str) -> Decision:
    """The model a request asks for could not be read from it (stage 4)."""
    return refusal(decision, "model_not_allowed", models_hint(dest), detail)


def request_rules(dest: Destination) -> list[str]:
    """Which request rules a destination declares: they need inspect mode in a tunnel."""
    return [k for k in ("methods", "paths", "models") if getattr(dest, k)]


def models_hint(dest: Destination) -> str:
    return f"destination {dest.name!r} allows models {dest.models}"
