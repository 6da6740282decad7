"""CloudStack VM names from VMware VM names.

CloudStack names follow hostname rules: only ASCII ``a``-``z``, ``0``-``9`` and ``-``; 1 to 63
characters; not starting or ending with ``-``; not starting with a digit. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Final
from uuid import UUID

MAX_VM_NAME_LENGTH: Final = 63
VALID_VM_NAME: Final = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
"""What CloudStack accepts (to be matched with ``fullmatch``)."""

_NOT_ALLOWED_RUN: Final = re.compile(r"[^a-z0-9]+")
_DIGEST_CHARACTERS: Final = 8
_TEST_INFIX: Final = "-test-"


def _digest(text: str) -> str:
    # surrogatepass: any Python str hashes, even one holding lone surrogates.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARACTERS]


def _fit(name: str, length: int) -> str:
    return name[:length].rstrip("-")


def sanitize_vm_name(name: str) -> str:
    """A valid CloudStack VM name for ``name``, deterministic and as recognisable as possible.

    Case-folded; accents and compatibility forms reduced to ASCII (``"Café"`` -> ``"cafe"``,
    full-width letters to ASCII); every run of other characters becomes one ``-``; ``-`` stripped
    at both ends; ``vm-`` put in front of a leading digit; cut to 63 characters. A name with
    nothing usable left (``"数据库"``, ``"@@@"``) becomes ``vm-`` and 8 hex digits of its SHA-256,
    so different such names do not collide. Sanitising a result again gives it back unchanged.

    >>> sanitize_vm_name("PhilB Test machine"), sanitize_vm_name("123StartWithDigit")
    ('philb-test-machine', 'vm-123startwithdigit')
    """
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    plain = "".join(char for char in decomposed if not unicodedata.combining(char))
    # casefold after NFKD again: compatibility forms may decompose to capitals ("Ⅻ" -> "XII").
    words = _NOT_ALLOWED_RUN.sub("-", plain.casefold()).strip("-")
    if not words:
        return f"vm-{_digest(name)}"
    if words[0].isdigit():
        words = f"vm-{words}"
    return _fit(words, MAX_VM_NAME_LENGTH)


def test_vm_name(sanitized: str, job_id: str | UUID) -> str:
    """The name of a test failover's VM: ``<name>-test-<first 8 hex digits of job_id>``.

    ``<name>`` is cut so the whole fits in 63 characters. ``sanitized`` should be a result of
    :func:`sanitize_vm_name`; anything else is sanitised first, so the result is always valid.
    A ``job_id`` with fewer than 8 hex digits (not a UUID) contributes 8 hex digits of its
    SHA-256 instead.
    """
    job_hex = "".join(char for char in str(job_id).lower() if char in "0123456789abcdef")
    suffix = job_hex[:_DIGEST_CHARACTERS]
    if len(suffix) < _DIGEST_CHARACTERS:
        suffix = _digest(str(job_id))
    tail = f"{_TEST_INFIX}{suffix}"
    return _fit(sanitize_vm_name(sanitized), MAX_VM_NAME_LENGTH - len(tail)) + tail


test_vm_name.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name
