"""TLS, mTLS and bearer tokens, for both servers (gateway, inference service) and their clients.

Server side:
- `TlsFiles` names a certificate chain, its key and, for mTLS, the CA that
  client certificates must chain to. `ServerTls` reads and checks them (a
  clear ValueError at start, never a traceback or a server that fails every
  handshake) and gives gRPC reloadable credentials: `reload()` (SIGHUP) reads
  the files again and, only if they load, hands the new certificate to gRPC
  through the cert_config_fetcher, which gRPC calls at each new connection's
  handshake. Open connections keep the certificate they were made with, so
  no call fails; new connections get the new one. If the new files do not
  load, the old certificate stays and the error is logged.
- `TokenAuth` is a generic RPC handler placed before the servicers' own: it
  answers UNAUTHENTICATED unless the call carries `authorization: Bearer
  <token>` with one of the file's tokens, and otherwise returns None (the
  next handler serves the call), so it costs nothing in the handlers
  themselves. Health and reflection stay open. Tokens are compared in
  constant time (SHA-256 digests, hmac.compare_digest against every token).

Client side: `ClientTls` (a CA to trust, a client certificate for mTLS) and
`ClientSecurity` (that plus a token): channels and call metadata.

No certificate, key or token is ever logged or put in an error message;
only file names are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import threading
from dataclasses import dataclass, field

import grpc

from protos.errors import Unauthenticated, abort_with

__all__ = [
    "TlsFiles", "ServerTls", "TokenAuth", "ClientTls", "ClientSecurity", "OPEN_METHOD_PREFIXES",
    "read_tokens", "read_token_file", "MISSING_TOKEN", "INVALID_TOKEN", "MALFORMED_TOKEN",
]  # fmt: skip

log = logging.getLogger(__name__)

# Health and reflection answer without a token (health checkers and ghz's
# reflection lookups carry none); every other method needs one.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

MISSING_TOKEN = "missing authorization metadata: send 'authorization: Bearer <token>'"
MALFORMED_TOKEN = "the authorization metadata is not 'Bearer <token>': send 'authorization: Bearer <token>'"
INVALID_TOKEN = "the bearer token is not valid"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ValueError(f"the {what} {path} is empty")
    return data


def _no_password() -> bytes:
    # ssl would otherwise prompt on the terminal for an encrypted key.
    return b""


def _check_pair(cert: str, key: str, client: bool = False) -> None:
    """That the files load as a PEM certificate chain and its (unencrypted) private key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if client else ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ValueError(f"the TLS certificate {cert} and key {key} do not load as a PEM certificate chain and "
                         f"its unencrypted private key ({reason})") from None


def _check_ca(path: str, what: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ValueError(f"the {what} {path} holds no PEM CA certificate ({reason})") from None


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS files (PEM). client_ca given: clients must present a certificate it signed (mTLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self) -> None:
        if not self.cert:
            raise ValueError("a TLS key needs its certificate: give --tls-cert FILE too")
        if not self.key:
            raise ValueError(f"the TLS certificate {self.cert} needs its private key: give --tls-key FILE too")
        if self.client_ca is not None and not self.client_ca:
            raise ValueError("--tls-client-ca is empty")

    @staticmethod
    def from_flags(cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
        """None when no TLS flag is given; ValueError for an incomplete set."""
        if not cert and not key:
            if client_ca:
                raise ValueError("--tls-client-ca (mTLS) needs TLS: give --tls-cert and --tls-key too")
            return None
        return TlsFiles(cert or "", key or "", client_ca or None)

    def read(self) -> grpc.ServerCertificateConfiguration:
        """The files, checked; ValueError says which one is wrong and why."""
        cert = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS key")
        _check_pair(self.cert, self.key)
        roots = None
        if self.client_ca:
            roots = _read(self.client_ca, "TLS client CA")
            _check_ca(self.client_ca, "TLS client CA")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)


class ServerTls:
    """A server's TLS credentials, reloadable while it serves."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._initial = files.read()  # ValueError at start: the server does not start with files it cannot use
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.files.client_ca is not None)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # At every new connection's handshake: a new configuration once after
        # a reload, None ("unchanged") otherwise. Cheap: it is on the accept path.
        with self._lock:
            config, self._pending = self._pending, None
        return config

    def reload(self) -> bool:
        """Reads the files again; True if they load (new connections get them),
        False if not (logged; the certificate in use stays)."""
        try:
            config = self.files.read()
        except ValueError as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        with self._lock:
            self._pending = config
        what = f"{self.files.cert}, {self.files.key}" + (f", client CA {self.files.client_ca}"
                                                          if self.files.client_ca else "")
        log.info("TLS certificate reloaded from %s; new connections use it", what)
        return True


def _parse_tokens(data: bytes, path: str) -> list[str]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"the tokens file {path} is not ASCII text (gRPC metadata values are ASCII)") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(not 0x21 <= ord(c) <= 0x7E for c in line):  # the line is never quoted: it is a secret
            raise ValueError(f"line {number} of the tokens file {path} is not a valid token "
                             "(spaces or control characters inside)")
        tokens.append(line)
    return tokens


def read_tokens(path: str) -> list[str]:
    """The bearer tokens of a file: one a line, blank lines and # comments ignored; at least one."""
    tokens = _parse_tokens(_read(path, "tokens file"), path)
    if not tokens:
        raise ValueError(f"the tokens file {path} holds no token (only blank lines or # comments)")
    return tokens


def read_token_file(path: str) -> str:
    """A client's token: the first one in the file (the same format as a server's tokens file)."""
    return read_tokens(path)[0]


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


async def _refuse_missing(request_iterator, context) -> None:
    await abort_with(context, Unauthenticated(MISSING_TOKEN))


async def _refuse_malformed(request_iterator, context) -> None:
    await abort_with(context, Unauthenticated(MALFORMED_TOKEN))


async def _refuse_invalid(request_iterator, context) -> None:
    await abort_with(context, Unauthenticated(INVALID_TOKEN))


# Stream handlers answer without reading a request, whatever the method's
# shape on the client side (as gateway.gate's refusal does).
_MISSING = grpc.stream_stream_rpc_method_handler(_refuse_missing)
_MALFORMED = grpc.stream_stream_rpc_method_handler(_refuse_malformed)
_INVALID = grpc.stream_stream_rpc_method_handler(_refuse_invalid)


class TokenAuth(grpc.GenericRpcHandler):
    """Bearer-token check in front of a grpc.aio server's handlers (see the module doc).

    Register it before every handler it protects, and only generic handlers
    after it: gRPC looks registered method handlers up before any generic one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests = self._load()  # ValueError at start: unreadable, not ASCII, or no token
        self.refused = 0  # calls answered UNAUTHENTICATED (a metric: tiergate_refusals_total)

    def _load(self) -> tuple[bytes, ...]:
        return tuple(_digest(t.encode("ascii")) for t in read_tokens(self.path))

    def reload(self) -> bool:
        """Reads the file again; True if it holds tokens (they replace the old
        ones at once), False if not (logged; the old tokens stay)."""
        try:
            digests = self._load()
        except ValueError as exc:
            log.error("tokens reload failed, still accepting the previous tokens: %s", exc)
            return False
        self._digests = digests  # one assignment: a call sees the old set or the new one
        log.info("bearer tokens reloaded from %s: %d token%s", self.path, len(digests),
                 "" if len(digests) == 1 else "s")
        return True

    def valid(self, token: str) -> bool:
        presented = _digest(token.encode("utf-8", "surrogatepass"))
        ok = False
        for digest in self._digests:  # every one, no early exit: the time says nothing about which matched
            ok |= hmac.compare_digest(presented, digest)
        return ok

    def refusal(self, metadata) -> grpc.RpcMethodHandler | None:
        """The refusing handler for a call's metadata, or None when its token is valid."""
        value = None
        for key, item in metadata or ():
            if key == "authorization":
                value = item
                break
        if value is None:
            return _MISSING
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _MALFORMED
        return None if self.valid(token) else _INVALID

    def service(self, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return None
        refusal = self.refusal(handler_call_details.invocation_metadata)
        if refusal is not None:
            self.refused += 1
        return refusal


@dataclass(frozen=True)
class ClientTls:
    """TLS towards a server: trust `ca` (None: the system's roots); cert+key: present them (mTLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a TLS client certificate and its key go together: give both")

    @staticmethod
    def from_flags(ca: str | None, cert: str | None, key: str | None) -> ClientTls | None:
        """None when no TLS flag is given (plaintext)."""
        if not (ca or cert or key):
            return None
        return ClientTls(ca or None, cert or None, key or None)

    def credentials(self) -> grpc.ChannelCredentials:
        """The files read and checked; ValueError says which one is wrong."""
        roots = None
        if self.ca:
            roots = _read(self.ca, "TLS CA file")
            _check_ca(self.ca, "TLS CA file")
        cert = key = None
        if self.cert:
            cert = _read(self.cert, "TLS client certificate")
            key = _read(self.key, "TLS client key")
            _check_pair(self.cert, self.key, client=True)
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a server: TLS or plaintext, and a bearer token or none."""

    tls: ClientTls | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr, a log or argv

    def __post_init__(self) -> None:
        if self.token is not None and (not self.token or any(not 0x21 <= ord(c) <= 0x7E for c in self.token)):
            raise ValueError("the bearer token is empty or holds spaces or non-ASCII characters")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata to send on every call (None: nothing to send)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def aio_channel(self, target: str, options=None) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, self.tls.credentials(), options=options)

    def channel(self, target: str, options=None) -> grpc.Channel:
        """A synchronous channel (tools and tests)."""
        if self.tls is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self.tls.credentials(), options=options)
