"""bench/ab.py's own parts: the verdict on the pairs, a side's code taken from git, its arguments."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.ab import checkout, pairs, parse_args
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


def test_checkout_of_an_unknown_commit_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="name a commit of this repository"):
        checkout("no-such-ref-" + "f" * 8, tmp_path / "code")


def test_settings_must_be_named_as_the_service_reads_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--b-setting", "GC=1"])
    assert "give it as FAILOVER_NAME=VALUE" in capsys.readouterr().err
    a = parse_args(["--b-setting", "FAILOVER_GC_YOUNG_COLLECTION_AFTER=50000", "--rounds", "2"])
    assert a.b_setting == ["FAILOVER_GC_YOUNG_COLLECTION_AFTER=50000"] and a.rounds == 2
