"""CloudStack's request signature check, as ``ApiServer.verifyRequest`` does it.

The signed string is every parameter but ``signature``, sorted by name (case-sensitive, as
Java's ``Collections.sort``), each ``name=value`` with the value encoded by Java's
``URLEncoder.encode(value, "UTF-8")`` and ``+`` replaced by ``%20``, joined by ``&`` and
lower-cased; the signature is the base64 HMAC-SHA1 of it under the secret key. With
``signatureVersion=3`` an ``expires`` timestamp is required and must not be in the past.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime

# Bytes java.net.URLEncoder leaves alone; note '~' is NOT among them (Python's quote keeps it).
_JAVA_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_")
_LEGACY_EXPIRES = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z([+-]\d{4})$")


def java_urlencode(value: str) -> str:
    """``URLEncoder.encode(value, "UTF-8").replaceAll("\\\\+", "%20")``."""
    out: list[str] = []
    for byte in value.encode("utf-8", errors="surrogatepass"):
        if byte in _JAVA_SAFE:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("%20")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def string_to_sign(params: Mapping[str, str]) -> str:
    """The lower-cased canonical request string CloudStack computes the HMAC over."""
    names = sorted(name for name in params if name.lower() != "signature")
    return "&".join(f"{name}={java_urlencode(params[name])}" for name in names).lower()


def compute_signature(params: Mapping[str, str], secret_key: str) -> str:
    """The base64 HMAC-SHA1 signature of a request's parameters."""
    digest = hmac.new(
        secret_key.encode("utf-8"), string_to_sign(params).encode("utf-8"), hashlib.sha1
    ).digest()
    return base64.b64encode(digest).decode("ascii")


def parse_expires(value: str) -> datetime | None:
    """Parse ``expires`` in the forms ``DateUtil.parseTZDateString`` accepts, or None."""
    legacy = _LEGACY_EXPIRES.match(value)
    if legacy:
        value = legacy.group(1) + legacy.group(2)
    try:  # the common forms (`cs` sends `...T..:..:..+0000`) without strptime's cost
        parsed: datetime | None = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.tzinfo is not None:
        return parsed
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"):  # (as before: either way round)
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            pass
    return None


def verify_request(
    params: Mapping[str, str], secrets_by_key: Mapping[str, str], now: datetime | None = None
) -> bool:
    """True if the request carries a known apiKey, a valid signature and no past ``expires``.

    ``params`` are the request's parameters with their names as sent (first value of each).
    """
    signature = api_key = version = expires = None
    for name, value in params.items():
        lowered = name.lower()
        if lowered == "signature":
            signature = value
        elif lowered == "apikey":
            api_key = value
        elif lowered == "signatureversion":
            version = value
        elif lowered == "expires":
            expires = value
    if signature is None or api_key is None:
        return False
    if version == "3":
        if expires is None:
            return False
        expires_at = parse_expires(expires)
        if expires_at is None or expires_at < (now or datetime.now(UTC)):
            return False
    secret = secrets_by_key.get(api_key)
    if secret is None:
        return False
    return hmac.compare_digest(signature, compute_signature(params, secret))
