"""What the metrics listener answers for the status page: ``/`` (the page), its script
and style sheet, and ``/status.json`` (the ``StatusBoard`` snapshot the page polls).

Self-contained for air-gapped sites: the three assets ship inside the package
(``status_assets/``) and the page loads nothing from anywhere else. The headers say so
to the browser as well: a Content-Security-Policy that allows only this origin's script,
style and ``fetch`` (no inline script, no frames, no forms), so even a host name that
somehow reached the page as markup could not run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from http import HTTPStatus
from importlib import resources
from typing import Final

from egress_guard.sinks.status import StatusBoard

__all__ = ["HEADERS", "Answer", "answer"]

#: every status page answer carries these
HEADERS: Final[tuple[tuple[str, str], ...]] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)

#: path -> (asset file, content type)
_ASSETS: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
}


@dataclass(frozen=True, slots=True)
class Answer:
    status: HTTPStatus
    body: bytes
    content_type: str


@cache
def _asset(name: str) -> bytes:
    return resources.files("egress_guard.sinks").joinpath("status_assets", name).read_bytes()


def answer(path: str, board: StatusBoard, health: Callable[[], bool]) -> Answer | None:
    """The answer for ``path``, or None when it is not one of the page's."""
    if path in _ASSETS:
        name, content_type = _ASSETS[path]
        return Answer(HTTPStatus.OK, _asset(name), content_type)
    if path == "/status.json":
        try:
            healthy: bool | None = bool(health())
        except Exception:
            healthy = False  # as /healthz: a health check that raises is unhealthy
        body = json.dumps(board.snapshot(healthy), ensure_ascii=True, allow_nan=False)
        return Answer(HTTPStatus.OK, body.encode(), "application/json")
    return None
