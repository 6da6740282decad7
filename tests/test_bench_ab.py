"""bench/ab.py's own parts: the verdict on the pairs, a side's code taken from git, its arguments."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.ab import checkout, pairs, parse_args, same_migrations
from bench.infra import ROOT, SERVICE_PACKAGES


def test_pairs_are_judged_round_by_round() -> None:
    # B cheaper in round 1 (5 < 10), dearer in round 2 (30 > 20): the median of 0.5 and 1.5
    got = pairs([10.0, 20.0], [5.0, 30.0], lower_better=True)
    assert got["b_over_a"] == [0.5, 1.5]
    assert got["median_b_over_a"] == 1.0
    assert got["b_better_in"] == "1 of 2"
    # for jobs/s higher is better: the same numbers, the other round wins
    assert pairs([10.0, 20.0], [5.0, 30.0], lower_better=False)["b_better_in"] == "1 of 2"
    assert pairs([10.0, 20.0, 30.0], [11.0, 21.0, 31.0], lower_better=False)["b_better_in"] == "3 of 3"


def test_a_round_without_a_reading_is_left_out_not_won() -> None:
    # no garbage-collector reading in round 2 (a serve without the metric), A read 0 in round 3
    got = pairs([10.0, None, 0.0, 8.0], [5.0, 1.0, 2.0, 16.0], lower_better=True)
    assert got["b_over_a"] == [0.5, None, None, 2.0]
    assert got["median_b_over_a"] == 1.25
    assert got["b_better_in"] == "1 of 3"  # round 3 has both readings: B's 2.0 is not below A's 0.0
    assert pairs([None], [None], lower_better=True) == {"a": [None], "b": [None], "b_over_a": [None],
                                                         "median_b_over_a": None, "b_better_in": "0 of 0"}


def test_checkout_writes_the_service_packages_of_a_commit(tmp_path: Path) -> None:
    commit = checkout("HEAD", tmp_path / "code")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    assert commit == head
    for pkg in SERVICE_PACKAGES:
        assert (tmp_path / "code" / pkg / "__init__.py").is_file()
    committed = subprocess.run(["git", "show", "HEAD:failover/cli.py"], cwd=ROOT, check=True,
                               capture_output=True).stdout
    assert (tmp_path / "code" / "failover" / "cli.py").read_bytes() == committed
    (tmp_path / "code" / "stale.py").write_text("left by an earlier checkout")
    checkout("HEAD", tmp_path / "code")
    assert not (tmp_path / "code" / "stale.py").exists()
    assert same_migrations(tmp_path / "code", ROOT)  # HEAD's migrations are the work tree's here
    versions = tmp_path / "code" / "adapters" / "migrations" / "versions"
    (versions / "9999_extra.py").write_text("revision = 'x'\n")
    assert not same_migrations(tmp_path / "code", ROOT)


def test_checkout_of_an_unknown_commit_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="name a commit of this repository"):
        checkout("no-such-ref-" + "f" * 8, tmp_path / "code")


def test_settings_must_be_named_as_the_service_reads_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--b-setting", "GC=1"])
    assert "give it as FAILOVER_NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # serve would ignore it, and A and B would run the same
        parse_args(["--b-setting", "FAILOVER_PROJECTOR_BATCH=64"])
    assert "serve has no such setting" in capsys.readouterr().err
    a = parse_args(["--b-setting", "FAILOVER_GC_YOUNG_COLLECTION_AFTER=50000", "--rounds", "2"])
    assert a.b_setting == ["FAILOVER_GC_YOUNG_COLLECTION_AFTER=50000"] and a.rounds == 2
