"""The tunnel fast path: pass a CONNECT tunnel through as bytes, and count them.

For a tunnel that is not inspected, mitmproxy would stack a server TLS layer, a client
TLS layer and the ``tls_clienthello`` hook before deciding to pass the bytes through,
and its pass-through layer counts nothing. The guard reads the ClientHello itself (to
check the SNI), then installs this layer directly: one relay step and two integer
additions per chunk. The counts are what the audit ``close`` record and the
``egress_guard_bytes_total`` metric report.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mitmproxy.net import check
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer


class ByteCounter(Protocol):
    bytes_up: int
    bytes_down: int


class CountingTCPLayer(TCPLayer):
    """TCPLayer(ignore=True) that adds up what it relays in each direction."""

    def __init__(
        self,
        context: Context,
        counter: ByteCounter,
        on_relaying: Callable[[Context, ByteCounter], None] | None = None,
    ) -> None:
        super().__init__(context, ignore=True)
        self.counter = counter
        #: called once, when both ends are connected and the first chunk is relayed (the
        #: guard's run mode hands the tunnel's later data to egress_guard.proxy.patches.splice)
        self.on_relaying = on_relaying

    def relay_messages(self, event: events.Event) -> Generator[Any, Any, None]:
        if self.on_relaying is not None:
            notify, self.on_relaying = self.on_relaying, None
            notify(self.context, self.counter)
        if type(event) is events.DataReceived:
            if event.connection is self.context.client:
                self.counter.bytes_up += len(event.data)
                yield commands.SendData(self.context.server, event.data)
            else:
                self.counter.bytes_down += len(event.data)
                yield commands.SendData(self.context.client, event.data)
            return
        yield from super().relay_messages(event)


_HANDSHAKE_CLIENT_HELLO = 0x01
MAX_CLIENT_HELLO = 64 * 1024
_EXT_SERVER_NAME = 0x0000
_EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D


def tls_layers(context: Context) -> Layer:
    """mitmproxy's TLS interception stack, as its NextLayer addon would build it."""
    server_tls = ServerTLSLayer(context)
    server_tls.child_layer = ClientTLSLayer(context)
    return server_tls


class HelloFacts(Protocol):
    """What the guard reads from a ClientHello: mitmproxy's ClientHello has it, and so
    does PlainHello."""

    @property
    def sni(self) -> str | None: ...

    @property
    def extensions(self) -> Sequence[tuple[int, bytes]]: ...


@dataclass(frozen=True, slots=True)
class PlainHello:
    sni: str | None
    #: (type, b"") per extension, in order: the guard looks only at the types
    extensions: tuple[tuple[int, bytes], ...]


_EXT_ALPN = 0x0010


def read_plain_client_hello(data: bytes) -> PlainHello | None:
    """The SNI and extension types of a ClientHello in its plain shape, or None.

    mitmproxy's parser (kaitaistruct) costs this machine about a tenth of a
    millisecond per tunnel. This reader takes only the shape every real client sends:
    the whole ClientHello in the first record, every length field consistent with the
    next, no more than one SNI extension, and that one naming exactly one valid host.
    For anything else it answers None and the caller uses mitmproxy's parser, which also
    reassembles records and reports errors. Where this reader answers, mitmproxy's parser
    reads the same name and the same extensions (tests/test_tunnel.py checks that on
    mutated ClientHellos): kaitai skips some length fields that this reader insists on,
    so this reader answers only where skipping them makes no difference.
    """
    n = len(data)
    if n < 9 or data[0] != 0x16 or data[1] != 0x03 or data[2] > 0x03:
        return None
    if data[5] != _HANDSHAKE_CLIENT_HELLO:
        return None
    rec_len = (data[3] << 8) | data[4]
    hs_len = (data[6] << 16) | (data[7] << 8) | data[8]
    if hs_len + 4 != rec_len or n < 5 + rec_len:
        return None  # several records, or not all here yet
    end = 9 + hs_len
    i = 9 + 2 + 32  # legacy_version, random
    if i + 1 > end:
        return None
    i += 1 + data[i]  # session id
    if i + 2 > end:
        return None
    suites = (data[i] << 8) | data[i + 1]
    if suites % 2:
        return None
    i += 2 + suites
    if i + 1 > end:
        return None
    i += 1 + data[i]  # compression methods
    if i + 2 > end:
        return None  # no extensions (or a stray byte): not the plain shape
    ext_end = i + 2 + ((data[i] << 8) | data[i + 1])
    if ext_end != end:
        return None
    i += 2
    types: list[tuple[int, bytes]] = []
    sni_body: tuple[int, int] | None = None
    while i < ext_end:
        if i + 4 > ext_end:
            return None
        etype = (data[i] << 8) | data[i + 1]
        elen = (data[i + 2] << 8) | data[i + 3]
        i += 4
        if i + elen > ext_end:
            return None
        if etype == _EXT_SERVER_NAME:
            if sni_body is not None:
                return None  # two SNI extensions
            sni_body = (i, i + elen)
        elif etype == _EXT_ALPN and not _alpn_consistent(data, i, i + elen):
            return None  # mitmproxy's parser reads ALPN bodies and may reject this one
        types.append((etype, b""))
        i += elen
    if sni_body is None:
        return PlainHello(None, tuple(types))
    a, b = sni_body
    if b - a < 5 or ((data[a] << 8) | data[a + 1]) != b - a - 2 or data[a + 2] != 0:
        return None
    if a + 5 + ((data[a + 3] << 8) | data[a + 4]) != b:
        return None  # more than one name, or lengths that do not add up
    host = bytes(data[a + 5 : b])
    if not check.is_valid_host(host):
        return None
    return PlainHello(host.decode("ascii"), tuple(types))


def _alpn_consistent(data: bytes, a: int, b: int) -> bool:
    if b - a < 2 or ((data[a] << 8) | data[a + 1]) != b - a - 2:
        return False
    j = a + 2
    while j < b:
        j += 1 + data[j]
    return j == b


def sni_problem(hello: HelloFacts) -> str | None:
    """Why a ClientHello's server name cannot be trusted, or None.

    mitmproxy's ``ClientHello.sni`` is None both when there is no SNI and when the SNI
    extension is unusual (two names, a bad host name, the extension twice); an upstream
    may still read the name from such an extension, so only a true absence counts as
    "no SNI". Encrypted ClientHello hides the real server name behind a public one.
    """
    types = [t for t, _ in hello.extensions]
    if _EXT_ENCRYPTED_CLIENT_HELLO in types:
        return "encrypted ClientHello (ECH) hides the server name"
    count = types.count(_EXT_SERVER_NAME)
    if count > 1:
        return "more than one SNI extension"
    if count == 1 and hello.sni is None:
        return "SNI extension is not a single valid host name"
    return None


def client_hello_shape_problem(data: bytes) -> str | None:
    """Refuse a TLS handshake record that cannot be starting a ClientHello, as soon as its
    first bytes show it, instead of waiting for a message that will never parse."""
    if len(data) >= 2 and data[1] != 0x03:
        return "not a TLS record (bad version byte)"
    if len(data) >= 6 and data[5] != _HANDSHAKE_CLIENT_HELLO:
        return "first TLS handshake message is not a ClientHello"
    if len(data) >= 9 and int.from_bytes(data[6:9], "big") > MAX_CLIENT_HELLO:
        return "ClientHello longer than 64 KiB"
    return None
