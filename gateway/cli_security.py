"""The TLS and token flags of the command line, shared by gateway.cli and gateway.bench's parser.

Part of the CLI (with gateway/cli.py, the only code that reads these flags
and their environment variables). Servers (`serve`, `gateway`, `inference`)
take --tls-cert/--tls-key/--tls-client-ca and --auth-tokens; clients
(`classify --target`, `bench --target`, and `gateway` towards the inference
service with an `inference-` prefix) take a CA to trust, a client
certificate for mTLS, and a token from a file or the environment, never
from argv (any local user can read a command line). Every file is read and
checked here, before anything starts, so that a bad one is a one-line error
and exit status 1, not a traceback or a server that fails every handshake.
"""

from __future__ import annotations

import argparse
from typing import Mapping

from protos.security import ClientSecurity, ClientTls, TlsFiles, read_token_file, read_tokens

__all__ = ["add_server_flags", "add_client_flags", "server_security", "client_security", "client_flags_given",
           "AUTH_TOKEN_ENV", "INFERENCE_TOKEN_ENV"]

AUTH_TOKEN_ENV = "TIERGATE_AUTH_TOKEN"            # classify/bench --target
INFERENCE_TOKEN_ENV = "TIERGATE_INFERENCE_TOKEN"  # gateway -> inference service


def add_server_flags(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"TLS and tokens ({what}; SIGHUP reads every file again, keeping the old "
                             "contents of one that does not load; open connections and calls are not disturbed)")
    g.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain (default: plaintext)")
    g.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key, unencrypted")
    g.add_argument("--tls-client-ca", metavar="FILE",
                   help="require a client certificate signed by this PEM CA (mTLS; needs --tls-cert)")
    g.add_argument("--auth-tokens", metavar="FILE",
                   help="bearer tokens, one a line (blank lines and # comments ignored): every call except "
                   "grpc.health.v1.Health and server reflection must send metadata 'authorization: Bearer TOKEN' "
                   "with one of them, or gets UNAUTHENTICATED (default: no token needed)")


def add_client_flags(p: argparse.ArgumentParser, *, prefix: str, token_flag: str, token_env: str, what: str,
                     note: str = "") -> None:
    """prefix '' gives --tls-ca, --tls-client-cert, --tls-client-key; 'inference-' gives --inference-tls-ca..."""
    g = p.add_argument_group(f"TLS and token towards {what}" + (f" ({note})" if note else ""))
    g.add_argument(f"--{prefix}tls-ca", metavar="FILE",
                   help=f"connect to {what} with TLS, trusting this PEM CA (default: plaintext)")
    g.add_argument(f"--{prefix}tls-client-cert", metavar="FILE",
                   help=f"present this PEM client certificate (mTLS; without --{prefix}tls-ca the system's CAs "
                   "are trusted)")
    g.add_argument(f"--{prefix}tls-client-key", metavar="FILE", help="the client certificate's PEM private key")
    g.add_argument(f"--{token_flag}", metavar="FILE",
                   help=f"send the (first) bearer token in FILE on every call (default: ${token_env}; none: no "
                   "token; never on the command line)")


def server_security(args) -> tuple[TlsFiles | None, str | None]:
    """(TLS files, tokens file) of a server's flags, every file read and checked now (ValueError)."""
    tls = TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
    if tls is not None:
        tls.read()
    if args.auth_tokens:
        read_tokens(args.auth_tokens)
    return tls, args.auth_tokens or None


def client_security(args, *, prefix: str, token_flag: str, token_env: str, environ: Mapping[str, str],
                    ) -> ClientSecurity:
    """TLS and token of a client's flags (the token from the file flag, else the environment); files checked now."""
    attr = prefix.replace("-", "_")
    tls = ClientTls.from_flags(getattr(args, f"{attr}tls_ca"), getattr(args, f"{attr}tls_client_cert"),
                               getattr(args, f"{attr}tls_client_key"))
    if tls is not None:
        tls.credentials()
    token_file = getattr(args, token_flag.replace("-", "_"))
    if token_file:
        token = read_token_file(token_file)
    else:
        token = (environ.get(token_env) or "").strip() or None
        if token is not None and any(not 0x21 <= ord(c) <= 0x7E for c in token):
            raise ValueError(f"${token_env} holds spaces or non-ASCII characters: it must be the token alone")
    return ClientSecurity(tls, token)


def client_flags_given(args, *, prefix: str, token_flag: str) -> list[str]:
    """The client TLS/token flags given on the command line (to refuse them where they do not apply)."""
    attr = prefix.replace("-", "_")
    names = [f"{prefix}tls-ca", f"{prefix}tls-client-cert", f"{prefix}tls-client-key", token_flag]
    return [f"--{n}" for n, a in zip(names, [f"{attr}tls_ca", f"{attr}tls_client_cert", f"{attr}tls_client_key",
                                             token_flag.replace("-", "_")]) if getattr(args, a, None)]
