"""A wave's list of VMs (failover/wave.py `read_ids`) and its exit code: no broker needed."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from failover.wave import WaveInputError, WaveJob, _Board, _middle, read_ids, wave_exit_code


def test_a_file_gives_the_first_word_of_each_line_after_the_arguments(tmp_path: Path) -> None:
    listing = tmp_path / "wave.txt"
    # saved with a byte-order mark, as Excel and PowerShell do; comments, blanks, extra words
    listing.write_bytes("\ufeffvm-1  web tier\r\n\n  # a comment\nvm-2#inline\n\tvm-3 \n".encode())
    assert read_ids(["vm-0"], str(listing), "VM") == ["vm-0", "vm-1", "vm-2", "vm-3"]


def test_stdin_is_a_file_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("vm-a\nvm-b\n"))
    assert read_ids([], "-", "VM") == ["vm-a", "vm-b"]


@pytest.mark.parametrize(("given", "text", "said"), [
    (["vm-1", "vm-2", "vm-1"], None, "VM vm-1 is given twice (--vm 1 and --vm 3)"),
    (["vm-1"], "vm-2\nvm-1\n", "VM vm-1 is given twice (--vm 1 and LIST line 2)"),
    ([" "], None, "--vm 1 is empty: give a VM id there"),
    ([], "# nobody\n\n", "no VM given (LIST lists none): give VM ids with --vm VM_ID, or a file of them with --vms-file"),
    ([], None, "no VM given: give VM ids with --vm VM_ID, or a file of them with --vms-file"),
    (["VM-1", "vm-1"], None, "VM vm-1 is given twice (--vm 1, as VM-1, and --vm 2)"),  # ids compare without case
])
def test_a_bad_list_is_refused_naming_where(tmp_path: Path, given: list[str], text: str | None, said: str) -> None:
    path = None
    if text is not None:
        path = str(tmp_path / "list.txt")
        Path(path).write_text(text)
    with pytest.raises(WaveInputError) as caught:
        read_ids(given, path, "VM", given_as="--vm")
    assert said.replace("LIST", str(path)) in str(caught.value)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WaveInputError, match=r"cannot read .*absent\.txt"):
        read_ids([], str(tmp_path / "absent.txt"), "VM")
    utf16 = tmp_path / "utf16.txt"  # what PowerShell's > writes
    utf16.write_bytes("vm-1\n".encode("utf-16"))
    with pytest.raises(WaveInputError, match=r"cannot read .*utf16\.txt: it is not UTF-8 .*save it as UTF-8"):
        read_ids([], str(utf16), "VM")


@pytest.mark.parametrize(("codes", "expected"), [
    ([0, 0, 0], 0), ([], 0), ([0, 3, 1, 4], 1), ([4, 2, 3], 2), ([0, 4, 3], 3), ([0, 4], 4)])
def test_the_wave_exit_code_is_the_worst_by_a_fixed_order(codes: list[int], expected: int) -> None:
    assert wave_exit_code(codes) == expected


def test_long_names_are_cut_in_the_middle_where_alike_names_still_differ() -> None:
    a, b = "production-web-frontend-cluster-node-0001", "production-web-frontend-cluster-node-0002"
    assert _middle(a) != _middle(b) and len(_middle(a)) == 40 and _middle(a).endswith("node-0001")
    assert _middle("short") == "short"


def _board_lines(width: int, height: int) -> list[str]:
    jobs = []
    for n in range(500):
        job = WaveJob(job_id=str(n), label=f"production-web-frontend-cluster-node-{n:04d}", command=None)
        job.state = ("running", "rolling back", "waiting", "JobCompleted")[n % 4]
        job.last = None
        job.step, job.step_order, job.total_steps, job.percent = "volume-attachment", 5, 6, 67
        job.started = time.monotonic() - 75
        jobs.append(job)
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(_Board(jobs, "test failover of 500 VMs", console))
    return console.export_text().splitlines()


@pytest.mark.parametrize(("width", "height"), [(80, 24), (50, 12), (160, 50)])
def test_the_board_fits_the_terminal_and_keeps_names_and_times_readable(width: int, height: int) -> None:
    lines = _board_lines(width, height)
    assert len(lines) <= height - 1 and all(len(line) <= width for line in lines)
    assert lines[1].startswith("125 completed, 125 rolling back, 125 running, 125 waiting"[: width - 1])
    rows = [line for line in lines[3:] if line.startswith("produ")]
    assert rows and all("rolling back" in row for row in rows)  # rolling back first
    assert all("0:01:1" in row for row in rows)  # how long, not cut away
    assert rows[0].split()[0].endswith("ode-0001")  # the name's distinct end, kept
    assert lines[-1].startswith(f"... and {250 - len(rows)} more running")


def test_a_watched_job_is_seeded_from_the_read_model() -> None:
    steps = [{"step_name": name, "step_order": n, "started_at": "2026-12-08T01:00:00+00:00" if n < 3 else None}
             for n, name in enumerate(["pre-failover-validation", "cloudstack-snapshot", "virtio-driver-injection",
                                       "vm-creation", "volume-attachment", "vm-startup-validation"], 1)]
    running = WaveJob(job_id="j1", label="vm-1", command=None)
    running.seed({"job": {"vm_name": "web 1", "percent_complete": 33, "status": "running",
                          "current_step": "virtio-driver-injection"}, "steps": steps, "manual_actions": []})
    assert (running.label, running.state, running.step, running.step_order, running.total_steps, running.percent) == (
        "web 1", "running", "virtio-driver-injection", 3, 6, 33)
    assert running.started is not None and time.monotonic() - running.started > 3600  # since its first step
    rolling = WaveJob(job_id="j2", label="vm-2", command=None)
    rolling.seed({"job": {"vm_name": None, "percent_complete": 50, "status": "running", "current_step": "rolling_back"},
                  "steps": steps, "manual_actions": [{"action": "delete", "resource_type": "snapshot",
                                                      "resource_id": "s-1", "detail": None}]})
    assert (rolling.label, rolling.state, rolling.step) == ("vm-2", "rolling back", "")  # not a step named so
    assert rolling.manual == ["delete snapshot s-1"]
    pending = WaveJob(job_id="j3", label="vm-3", command=None)  # accepted, not projected yet (a synthetic row)
    pending.seed({"job": {"id": "j3", "job_type": None, "status": "pending", "percent_complete": 0, "vm_id": "vm-3",
                          "vm_name": "db 3", "current_step": None}, "steps": [], "manual_actions": []})
    assert (pending.label, pending.state, pending.started) == ("db 3", "waiting", None)
