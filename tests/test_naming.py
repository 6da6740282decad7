"""VM names for CloudStack: the seed guide's examples and the hostname rules for any input."""

from __future__ import annotations

import re
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statemachine import naming

CLOUDSTACK_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
JOB_ID = "7d7e1f0e-3c55-4e8e-9d9a-0d5e7f1b2a10"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # The seed guide's "Example Transformations", exactly.
        ("PhilB Test machine", "philb-test-machine"),
        ("pgtest2", "pgtest2"),
        ("VM-123_Test@2025", "vm-123-test-2025"),
        ("123StartWithDigit", "vm-123startwithdigit"),
        # The comments of its sanitizeVMName.
        ("123 Server", "vm-123-server"),
        ("My_VM@2025", "my-vm-2025"),
    ],
)
def test_the_seed_guides_examples(name: str, expected: str) -> None:
    assert naming.sanitize_vm_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Café", "cafe"),
        ("Ångström-Überserver", "angstrom-uberserver"),
        ("Straße", "strasse"),
        ("\uff37\uff29\uff2e\uff12\uff10\uff11\uff19", "win2019"),  # full-width "WIN2019"
        ("İstanbul", "istanbul"),
        ("  --web__01--  ", "web-01"),
        ("a" * 100, "a" * 63),
        ("9" * 100, "vm-" + "9" * 60),
        ("ab" + "-" * 60 + "cd", "ab-cd"),
        ("x" * 62 + " y", "x" * 62),  # cut, then no '-' left at the end
    ],
)
def test_unicode_and_edges_become_readable_ascii(name: str, expected: str) -> None:
    assert naming.sanitize_vm_name(name) == expected


@pytest.mark.parametrize("name", ["", "数据库", "@@@", "---", "🚀", "\ud800"])
def test_a_name_with_nothing_usable_gets_a_stable_hashed_name(name: str) -> None:
    result = naming.sanitize_vm_name(name)
    assert re.fullmatch(r"vm-[0-9a-f]{8}", result)
    assert naming.sanitize_vm_name(name) == result


def test_different_unusable_names_do_not_collide() -> None:
    names = ["数据库", "数据", "@@@", "@@", "", "🚀", "🚀🚀"]
    assert len({naming.sanitize_vm_name(name) for name in names}) == len(names)


def test_a_test_vms_name_carries_the_job() -> None:
    assert naming.test_vm_name("pgtest2", JOB_ID) == "pgtest2-test-7d7e1f0e"
    assert naming.test_vm_name("pgtest2", UUID(JOB_ID)) == "pgtest2-test-7d7e1f0e"
    long = naming.test_vm_name("a" * 63, JOB_ID)
    assert long == "a" * 49 + "-test-7d7e1f0e"
    assert len(long) == 63
    assert naming.test_vm_name("a" * 48 + "-bc", JOB_ID) == "a" * 48 + "-test-7d7e1f0e"


def test_a_test_vm_name_tolerates_unsanitised_names_and_odd_job_ids() -> None:
    assert naming.test_vm_name("PhilB Test machine", JOB_ID) == "philb-test-machine-test-7d7e1f0e"
    assert re.fullmatch(r"pgtest2-test-[0-9a-f]{8}", naming.test_vm_name("pgtest2", "job-7"))


@given(st.text())
def test_any_name_sanitises_to_a_valid_stable_name(name: str) -> None:
    result = naming.sanitize_vm_name(name)
    assert CLOUDSTACK_NAME.match(result)
    assert naming.sanitize_vm_name(name) == result
    assert naming.sanitize_vm_name(result) == result


@given(st.text(), st.text() | st.uuids().map(str))
def test_any_test_vm_name_is_valid_and_stable(name: str, job_id: str) -> None:
    result = naming.test_vm_name(naming.sanitize_vm_name(name), job_id)
    assert CLOUDSTACK_NAME.match(result)
    assert naming.test_vm_name(naming.sanitize_vm_name(name), job_id) == result
    assert CLOUDSTACK_NAME.match(naming.test_vm_name(name, job_id))


@given(st.uuids())
def test_a_test_vm_name_ends_with_the_jobs_first_8_hex_digits(job_id: UUID) -> None:
    assert naming.test_vm_name("pgtest2", str(job_id)).endswith(f"-test-{job_id.hex[:8]}")
