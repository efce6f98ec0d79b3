"""TLS on both gRPC ports, when GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE are set: the
contexts its servers and this host's probe connect with (`tls_watch` reads the files
again when they change).

- TLS 1.2 at least, HTTP/2 chosen by ALPN (gRPC's clients refuse a server that does
  not name it). With GRPC_TLS_CLIENT_CA_FILE, every client must present a certificate
  that CA issued (mutual TLS); without it, any client may connect.
- A file that cannot be used at start-up stops it, naming the variable and why. An
  encrypted key is refused, never asked for its pass phrase on a terminal.
"""

from __future__ import annotations

import ssl

from financing.config import GRPC_TLS_CERT_FILE, GRPC_TLS_CLIENT_CA_FILE, GRPC_TLS_KEY_FILE, GrpcTls
from financing.tls_files import load_authorities, load_key_pair

# TLS 1.2's suites that HTTP/2 allows (RFC 9113 section 9.2.2: ephemeral keys, AEAD);
# TLS 1.3's are all allowed.
HTTP2_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(tls: GrpcTls) -> ssl.SSLContext:
    """A server context serving `tls`'s certificate and key over HTTP/2, asking clients
    for a certificate its client CA issued when it names one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(HTTP2_CIPHERS)
    context.set_alpn_protocols(["h2"])
    _load_key_pair(context, tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        load_authorities(context, tls.client_ca_file, GRPC_TLS_CLIENT_CA_FILE.name)
        # No session resumed: a resumed session skips the client's certificate, and a
        # client whose CA was taken out of the file went on being served on tickets the
        # first context had issued.
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    return context


def client_context(tls: GrpcTls | None) -> ssl.SSLContext:
    """What this host's own probe connects with: it asks the process listening at an
    address it was given whether it serves, so the server's certificate is not checked
    (it names the service's public names, not the probe's address). Where clients must
    present a certificate, the probe presents the server's own; without `tls` (a probe
    asking whether a port speaks TLS at all), none."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if tls is not None and tls.client_ca_file is not None:
        _load_key_pair(context, tls.cert_file, tls.key_file)
    return context


def _load_key_pair(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    load_key_pair(
        context, cert_file, key_file, cert=GRPC_TLS_CERT_FILE.name, key=GRPC_TLS_KEY_FILE.name
    )
