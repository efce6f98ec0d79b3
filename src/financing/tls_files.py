"""Reading TLS files (certificates, private keys, CA certificates) into a context, with
errors that name the setting that gave each file and say why it cannot be used. An
encrypted key is refused, never asked for its pass phrase on a terminal. And when the
first certificate of a chain to expire expires, for the metrics that say it."""

from __future__ import annotations

import re
import ssl
from datetime import UTC, datetime


class UnusableFiles(Exception):
    """The TLS files cannot be used; the message names the setting and why."""


class _Encrypted(Exception):
    pass


def _no_pass_phrase() -> str:
    raise _Encrypted


def load_key_pair(
    context: ssl.SSLContext, cert_file: str, key_file: str, *, cert: str, key: str
) -> None:
    """The certificate (chain) in `cert_file` and its private key in `key_file`; `cert`
    and `key` name the settings that gave them."""
    # The certificate alone first, so that a failure of the pair names the right file.
    load_authorities(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_file, cert, leaf=True)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_pass_phrase)
    except _Encrypted:
        raise UnusableFiles(
            f"{key}: the private key in {key_file} is encrypted; the service reads an"
            " unencrypted key (PEM), kept readable by the service alone"
        ) from None
    except OSError as error:  # ssl.SSLError is one too
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            raise UnusableFiles(
                f"{key}: the private key in {key_file} is not the one of the certificate"
                f" in {cert_file} ({cert})"
            ) from None
        if isinstance(error, ssl.SSLError):
            # OpenSSL's reason: a key of another type than the certificate's is not
            # assigned to it, which the file's form alone does not say.
            why = str(getattr(error, "reason", None) or "").lower().replace("_", " ")
            raise UnusableFiles(
                f"{key}: {key_file} holds no PEM private key of the certificate in"
                f" {cert_file}" + (f" ({why})" if why else "")
            ) from None
        raise UnusableFiles(unreadable(key, key_file, error)) from None


def load_authorities(
    context: ssl.SSLContext, path: str, name: str, *, leaf: bool = False, issuing: bool = True
) -> None:
    """The certificates in `path` (PEM), which `name` gave, as those `context` trusts;
    `leaf`: a certificate of its own, not a CA's; `issuing`: at least one must be a CA
    certificate (one that may issue others)."""
    what = "certificate" if leaf else "CA certificate"
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise UnusableFiles(f"{name}: {path} holds no {what} in PEM form") from None
    except OSError as error:
        raise UnusableFiles(unreadable(name, path, error)) from None
    if issuing and not leaf and not context.cert_store_stats()["x509_ca"]:
        raise UnusableFiles(
            f"{name}: {path} holds no CA certificate (one that may issue others): no"
            " certificate it names could be accepted"
        )


def unreadable(name: str, path: str, error: OSError) -> str:
    return f"{name}: cannot read {path}: {error.strerror or error}"


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def certificate_expiry(cert_file: str) -> float | None:
    """When the first of the certificates in `cert_file` (a chain, PEM) to expire expires,
    as Unix time; None when the file cannot be read again or holds none (it was read
    whole a moment before, by the context serving it)."""
    try:
        with open(cert_file, encoding="ascii", errors="replace") as file:
            text = file.read()
        return min(
            _not_after(ssl.PEM_cert_to_DER_cert(pem)) for pem in _PEM_CERTIFICATE.findall(text)
        )
    except (OSError, ValueError, IndexError):  # ValueError: min() of nothing, bad DER
        return None


def _not_after(der: bytes) -> float:
    """The end of a DER certificate's validity (RFC 5280 section 4.1), as Unix time."""
    _, content, _ = _element(der, 0)  # Certificate
    _, at, _ = _element(der, content)  # TBSCertificate
    tag, _, end = _element(der, at)
    if tag == 0xA0:  # [0] version, present from version 2 on
        at = end
    for _ in range(3):  # serial number, signature algorithm, issuer
        at = _element(der, at)[2]
    _, validity, _ = _element(der, at)
    tag, start, end = _element(der, _element(der, validity)[2])  # past notBefore
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: years 1950-2049
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError(f"not a time: tag {tag:#x}")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC).timestamp()


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """The tag of the DER element at `at`, where its content begins and ends."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length
