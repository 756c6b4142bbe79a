"""Load a policy file into an effective policy: includes and catalog references resolved.

Every error names ``file:line`` and carries a hint. Loading has no side effects, so a
reload that fails leaves the running proxy exactly as it was.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from egress_guard.normalize import NormalizationError, normalize_host
from egress_guard.policy.errors import PolicyError, from_validation
from egress_guard.policy.model import (
    Catalog,
    CatalogEntry,
    Clients,
    DenyRule,
    Destination,
    Network,
    PolicyFile,
    UseRef,
)
from egress_guard.policy.yamlsrc import Path, SourceDoc, SourceError, parse_yaml

MAX_FILE_BYTES = 4 * 1024 * 1024


@contextmanager
def _policy_errors() -> Iterator[None]:
    """Raise every file:line error of loading as PolicyError.

    The YAML reader and ``SourceDoc.error`` raise the base SourceError; callers (the CLI,
    the reload path) catch PolicyError, so a duplicate key or an unknown preset must not
    escape as anything else.
    """
    try:
        yield
    except PolicyError:
        raise
    except SourceError as e:
        raise PolicyError(e.file, e.line, e.message, e.hint) from None


@dataclass(frozen=True)
class EffectivePolicy:
    """What the engine enforces: a flat list of destinations and deny rules."""

    mode: str
    destinations: tuple[Destination, ...]
    deny: tuple[DenyRule, ...]
    network: Network
    clients: Clients
    source: str
    sha256: str
    #: destination name -> "file:line" where it was written (for block hints)
    origins: dict[str, str] = field(default_factory=dict)
    deny_origins: tuple[str, ...] = ()


def policies_dir() -> FsPath:
    """The shipped ``policies/`` folder (catalog and presets), installed or in a checkout."""
    return FsPath(str(resources.files("egress_guard._policies")))


@lru_cache(maxsize=64)
def shipped_preset(origin: str) -> str | None:
    """The shipped preset ``origin`` is in (a path, or a ``file:line`` origin such as
    ``EffectivePolicy.origins`` holds), or None. Hints use it never to tell anyone to edit
    a file in ``policies/``: an upgrade replaces those, and every other user of the
    preset would change too."""
    path = origin.split(" (included from ", 1)[0]
    head, sep, tail = path.rpartition(":")
    if sep and (tail.isdigit() or tail == "None"):
        path = head
    p = FsPath(path)
    if p.suffix not in (".yaml", ".yml") or p.stem == "catalog":
        return None
    try:
        shipped = p.resolve().parent == policies_dir().resolve()
    except OSError:
        return None
    return p.stem if shipped else None


def preset_names() -> list[str]:
    return sorted(p.stem for p in policies_dir().glob("*.yaml") if p.stem != "catalog")


def read_regular_file(path: FsPath, what: str = "policy", limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, read without ever blocking on what sits at ``path``.

    A FIFO would block ``open()`` until a writer comes, and a device such as
    ``/dev/zero`` never ends; either would hold the reload lock (and keep the worker
    thread, and so shutdown, waiting) for good. So: open non-blocking, without taking a
    controlling terminal, ``fstat`` what was opened (a symlink swapped in between the
    caller's stat and this open is caught here) and read at most ``limit`` bytes.
    Raises PolicyError naming the file.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise PolicyError(str(path), None, f"cannot read {what}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(
                str(path),
                None,
                f"cannot read {what}: not a regular file ({_file_kind(st.st_mode)})",
                "point it at a plain file; FIFOs, devices and directories are refused",
            )
        if st.st_size > limit:
            raise PolicyError(str(path), None, f"file is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew since fstat
            raise PolicyError(str(path), None, f"file is larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise PolicyError(str(path), None, f"cannot read {what}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _read(path: FsPath, what: str = "policy") -> str:
    raw = read_regular_file(path, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PolicyError(str(path), line, "file is not valid UTF-8") from e


def _validate_file(doc: SourceDoc) -> PolicyFile:
    if not isinstance(doc.data, dict):
        raise PolicyError(
            doc.file, doc.line_of(()) or 1, "a policy must be a mapping", "start with 'version: 1'"
        )
    try:
        return PolicyFile.model_validate(doc.data)
    except ValidationError as e:
        raise from_validation(doc, e, PolicyFile) from None


@lru_cache(maxsize=4)
def _load_catalog_cached(path: str, mtime_ns: int) -> dict[str, CatalogEntry]:
    doc = parse_yaml(_read(FsPath(path), "catalog"), path)
    try:
        cat = Catalog.model_validate(doc.data)
    except ValidationError as e:
        raise from_validation(doc, e, Catalog) from None
    entries: dict[str, CatalogEntry] = {}
    errors: list[SourceError] = []
    for i, entry in enumerate(cat.entries):
        if entry.name in entries:
            errors.append(
                doc.error(("entries", i, "name"), f"duplicate catalog entry {entry.name!r}")
            )
        entries[entry.name] = entry
    if errors:
        raise PolicyError.of(errors)
    return entries


def is_catalog_file(path: str | FsPath) -> bool:
    """True when ``path`` is a catalog (a mapping with ``entries:``, like the shipped
    ``policies/catalog.yaml``) rather than a policy, so ``validate policies/*.yaml``
    checks each file as what it is. A file that cannot be read or parsed is not: loading
    it as a policy then reports why."""
    try:
        doc = parse_yaml(_read(FsPath(path)), str(path))
    except SourceError:
        return False
    return isinstance(doc.data, dict) and "entries" in doc.data and "destinations" not in doc.data


def load_catalog(path: FsPath | None = None) -> dict[str, CatalogEntry]:
    """OpenCode's destination table, by entry name."""
    p = path or policies_dir() / "catalog.yaml"
    try:
        mtime = p.stat().st_mtime_ns
    except OSError as e:
        raise PolicyError(str(p), None, f"cannot read catalog: {e.strerror or e}") from e
    with _policy_errors():
        return _load_catalog_cached(str(p), mtime)


@dataclass
class _Collected:
    destinations: list[Destination] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)
    deny: list[DenyRule] = field(default_factory=list)
    deny_origins: list[str] = field(default_factory=list)
    #: every error found, so one run of ``validate`` reports them all
    errors: list[SourceError] = field(default_factory=list)


def _collect(
    doc: SourceDoc,
    pf: PolicyFile,
    catalog: dict[str, CatalogEntry],
    out: _Collected,
    stack: tuple[str, ...],
) -> None:
    for i, name in enumerate(pf.include):
        try:
            _include(doc, i, name, catalog, out, stack)
        except SourceError as e:
            out.errors.append(e)
    for i, item in enumerate(pf.destinations):
        try:
            _destination(doc, i, item, catalog, out)
        except SourceError as e:
            out.errors.append(e)
    for i, rule in enumerate(pf.deny):
        out.deny.append(rule)
        out.deny_origins.append(f"{doc.file}:{doc.line_of(('deny', i))}")


def _include(
    doc: SourceDoc,
    i: int,
    name: str,
    catalog: dict[str, CatalogEntry],
    out: _Collected,
    stack: tuple[str, ...],
) -> None:
    if name in stack:
        raise doc.error(("include", i), f"include cycle: {' -> '.join((*stack, name))}")
    preset = policies_dir() / f"{name}.yaml"
    if name == "catalog" or not preset.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        raise doc.error(
            ("include", i),
            f"unknown preset {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            f"shipped presets: {', '.join(preset_names())}",
        )
    sub_doc = parse_yaml(_read(preset), str(preset))
    sub = _validate_file(sub_doc)
    before = len(out.destinations)
    _collect(sub_doc, sub, catalog, out, (*stack, name))
    where = f"{doc.file}:{doc.line_of(('include', i))}"
    for dest in out.destinations[before:]:
        out.origins[dest.name] = f"{out.origins[dest.name]} (included from {where})"


def _destination(
    doc: SourceDoc,
    i: int,
    item: UseRef | Destination,
    catalog: dict[str, CatalogEntry],
    out: _Collected,
) -> None:
    path: Path = ("destinations", i)
    if isinstance(item, UseRef):
        entry = catalog.get(item.use)
        if entry is None:
            close = difflib.get_close_matches(item.use, sorted(catalog), n=1)
            raise doc.error(
                (*path, "use"),
                f"no catalog entry named {item.use!r}"
                + (f" (did you mean {close[0]!r}?)" if close else ""),
                f"catalog entries: {', '.join(sorted(catalog))}",
            )
        if (why := entry.usable) is not None:
            raise doc.error((*path, "use"), f"cannot use {item.use!r}", why)
        dest = entry.as_destination()
    else:
        dest = item
    existing = next((d for d in out.destinations if d.name == dest.name), None)
    if existing is not None:
        if existing == dest:
            return  # the same catalog entry reached twice (e.g. a preset and a use:)
        raise doc.error(
            (*path, "name") if not isinstance(item, UseRef) else (*path, "use"),
            f"duplicate destination name {dest.name!r} (first at {out.origins[dest.name]})",
            "names label audit records and metrics, so each must be unique",
        )
    out.destinations.append(dest)
    out.origins[dest.name] = f"{doc.file}:{doc.line_of(path)}"


def _fingerprint(pol: dict[str, Any]) -> str:
    blob = json.dumps(pol, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def load_policy_text(text: str, file: str, catalog_path: FsPath | None = None) -> EffectivePolicy:
    """Load policy text, or raise PolicyError naming ``file:line``."""
    with _policy_errors():
        return _load_policy_text(text, file, catalog_path)


def _load_policy_text(text: str, file: str, catalog_path: FsPath | None) -> EffectivePolicy:
    doc = parse_yaml(text, file)
    pf = _validate_file(doc)
    catalog = load_catalog(catalog_path)
    out = _Collected()
    _collect(doc, pf, catalog, out, ())
    for host, addrs in pf.network.resolve.items():
        try:
            _check_resolve_entry(doc, host, addrs)
        except SourceError as e:
            out.errors.append(e)
    if pf.clients.auth is not None:
        try:
            _check_users_file(doc, file, pf.clients.auth.users_file)
        except SourceError as e:
            out.errors.append(e)
    if out.errors:
        raise PolicyError.of(out.errors)
    effective = {
        "mode": pf.mode,
        "destinations": [d.model_dump(mode="json") for d in out.destinations],
        "deny": [d.model_dump(mode="json") for d in out.deny],
        "network": pf.network.model_dump(mode="json"),
        "clients": pf.clients.model_dump(mode="json"),
    }
    return EffectivePolicy(
        mode=pf.mode,
        destinations=tuple(out.destinations),
        deny=tuple(out.deny),
        network=pf.network,
        clients=pf.clients,
        source=file,
        sha256=_fingerprint(effective),
        origins=out.origins,
        deny_origins=tuple(out.deny_origins),
    )


def _check_users_file(doc: SourceDoc, file: str, users_file: str) -> None:
    users = FsPath(users_file)
    if not users.is_absolute():
        users = FsPath(file).parent / users
    try:
        regular = stat.S_ISREG(os.stat(users).st_mode)
    except OSError:
        raise doc.error(
            ("clients", "auth", "users_file"), f"users_file {str(users)!r} does not exist"
        ) from None
    if not regular:
        raise doc.error(
            ("clients", "auth", "users_file"),
            f"users_file {str(users)!r} is not a regular file",
            "point it at a plain file; FIFOs, devices and directories are refused",
        )


def _check_resolve_entry(doc: SourceDoc, host: str, value: str | list[str]) -> None:
    path: Path = ("network", "resolve", host)
    try:
        if normalize_host(host).ip is not None:
            raise doc.error(path, f"{host!r} is an address; resolve maps names to addresses")
    except NormalizationError as e:
        raise doc.error(path, f"invalid host {host!r}: {e}") from None
    addrs = value if isinstance(value, list) else [value]
    if not addrs:
        raise doc.error(path, f"{host!r} maps to no address")
    for a in addrs:
        try:
            h = normalize_host(a)
        except NormalizationError as e:
            raise doc.error(path, f"{a!r} is not an IP address: {e}") from None
        if h.ip is None:
            raise doc.error(path, f"{a!r} is not an IP address")


def load_policy(path: str | FsPath, catalog_path: FsPath | None = None) -> EffectivePolicy:
    """Load a policy file, or raise PolicyError naming ``file:line``."""
    p = FsPath(path)
    return load_policy_text(_read(p), str(p), catalog_path)


def load_preset(name: str) -> EffectivePolicy:
    p = policies_dir() / f"{name}.yaml"
    if not p.is_file():
        raise PolicyError(name, None, f"unknown preset {name!r}", ", ".join(preset_names()))
    return load_policy(p)
