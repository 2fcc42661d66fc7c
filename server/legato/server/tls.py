"""The daemon's TLS: its certificate, its key and, for mutual TLS, its clients' CA.

The files are read and checked in `legato.common.tls`, which the clients use
too, so both sides refuse the same mistakes with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from legato.common.tls import TLSError, read_certificates, read_key_pair

__all__ = ["ServerTLS", "TLSError"]


@dataclass(frozen=True)
class ServerTLS:
    """What the daemon serves TLS with.

    Attributes:
        cert: its certificate (PEM; the chain, leaf first), naming the host
            clients connect to.
        key: the certificate's private key (PEM, unencrypted, mode 0600).
        client_ca: for mutual TLS: the CA that signs the clients' certificates.
            Clients without a certificate it signed are refused at the handshake.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Reads and checks the files; raises `TLSError` with what to fix."""
        key, chain = read_key_pair(self.cert, self.key)
        roots = None
        if self.client_ca is not None:
            roots = read_certificates(self.client_ca, "client CA")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=roots, require_client_auth=roots is not None
        )
