"""TLS files: reading and checking certificates and keys, for the daemon and its clients.

The daemon (`legato serve --tls-cert/--tls-key/--tls-client-ca`) and the
clients (`LEGATO_TLS_CA`, `LEGATO_TLS_CERT`, `LEGATO_TLS_KEY`) read their files
here, so both refuse the same mistakes, each with one line that names the file
and says what to change: a file that is missing or is no PEM, a key that does
not belong to its certificate, a key protected by a passphrase (gRPC cannot
use one), and a key other users can read.

The files are read and checked with Python's `ssl` module before gRPC sees
them: gRPC takes any bytes and fails only at the first handshake, with no hint
of which file was wrong.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

CERTIFICATE_MARK = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY_MARK = b"PRIVATE KEY-----"


class TLSError(ValueError):
    """A certificate or key legato cannot use; the message names the file and the fix."""


def read_file(path: Path, what: str, *, private: bool = False) -> bytes:
    """The bytes of `path`; with `private`, only if no other user can read it.

    The mode is taken from the open file itself, so the file checked is the
    file read.
    """
    try:
        with path.open("rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            if private and mode & 0o077:
                raise TLSError(
                    f"the TLS {what} {path} can be read by other users (mode {mode:04o}); a "
                    f"private key must be yours alone: chmod 600 {path}"
                )
            return file.read()
    except TLSError:
        raise
    except OSError as exc:
        raise TLSError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None


def read_certificates(path: Path, what: str) -> bytes:
    """PEM certificates to trust (a CA, or a bundle of them), checked to parse."""
    pem = read_file(path, what)
    if CERTIFICATE_MARK not in pem:
        raise TLSError(
            f"the TLS {what} {path} holds no PEM certificate (a '{CERTIFICATE_MARK.decode()}' "
            "block); give the CA's certificate, not its key"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise TLSError(f"the TLS {what} {path} is not a valid PEM certificate: {exc}") from None
    return pem


def _refuse_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal for the passphrase.
    raise TLSError("passphrase")


def read_key_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """(key, certificate chain) as PEM, checked to belong together.

    The key must be private (mode 0600 or stricter) and unencrypted.
    """
    chain = read_file(cert, "certificate")
    if CERTIFICATE_MARK not in chain:
        raise TLSError(
            f"the TLS certificate {cert} holds no PEM certificate (a "
            f"'{CERTIFICATE_MARK.decode()}' block); are the certificate and the key swapped?"
        )
    key_pem = read_file(key, "key", private=True)
    if PRIVATE_KEY_MARK not in key_pem:
        raise TLSError(
            f"the TLS key {key} holds no PEM private key (a '-----BEGIN ... PRIVATE KEY-----' "
            "block); are the certificate and the key swapped?"
        )
    if b"ENCRYPTED" in key_pem:
        raise TLSError(_encrypted(key))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            cert, key, password=_refuse_passphrase
        )
    except TLSError:
        raise TLSError(_encrypted(key)) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(
                f"the TLS key {key} does not belong to the certificate {cert}; give the key "
                "the certificate was issued for"
            ) from None
        raise TLSError(f"cannot use the TLS certificate {cert} with the key {key}: {exc}") from None
    return key_pem, chain


def _encrypted(key: Path) -> str:
    return (
        f"the TLS key {key} is protected by a passphrase, which gRPC cannot use; write an "
        f"unencrypted copy that only you can read: openssl pkey -in {key} -out KEY.pem "
        "&& chmod 600 KEY.pem"
    )
