"""A job looks its VM up by name only where that VM can be nobody else's: while it holds the
name (`vm_name_claims`), and only a VM of its own display name (its source VM's name). Two
source VMs may sanitise to one name (`web_01`, `web 01`), and a live failover names its VM after
its source VM alone."""

from __future__ import annotations

from transitions.extensions.asyncio import AsyncMachine

from statemachine.engine import drive
from statemachine.naming import sanitize_vm_name
from statemachine.ports import Commit, JobRow
from tests.fakes import FakeJobStore, Harness

from .helpers import last


def _on_vm_intent(action: object) -> object:
    """A commit hook: `action(store)` once, at the commit that records the job's VM intent."""
    done: list[bool] = []

    def hook(store: FakeJobStore, job: JobRow, commit: Commit) -> None:
        if not done and any(e.key == "vm" and e.status == "intended" for e in commit.ledger):
            done.append(True)
            action(store)  # type: ignore[operator]

    return hook


async def test_a_job_whose_name_another_job_holds_leaves_the_vm_under_it_alone(
        h: Harness, machine: AsyncMachine) -> None:
    """A job recorded its VM's intent without holding the name (as before the claims existed),
    its deploy failed, and meanwhile its twin (a source VM of the very same name, in another
    datacenter: the same display name too) holds the name and deployed under it. The job
    neither takes that VM on its retry nor touches it in its rollback, which restores the rest
    and says what to check; after the twin completed (its claim released), still not."""
    vm = h.seed_vm("web 01", os_type="Linux", disks=1)
    twin = h.seed_vm("web 01", os_type="Linux", disks=1)
    name = sanitize_vm_name(vm.vm_name)
    twin_job = h.new_job(twin, "live-failover")  # running: it holds the name
    made: list[str] = []

    def twin_takes_the_name(store: FakeJobStore) -> None:
        store.claims[name] = twin_job.row.job_id
        other = h.world.add_vm(name, "Running")
        other.display_name = vm.vm_name
        made.append(other.id)

    h.store.hooks.append(_on_vm_intent(twin_takes_the_name))  # type: ignore[arg-type]
    h.faults.add("deployVirtualMachine", "transient")
    before = h.world.observable()
    ctx = h.new_job(vm, "live-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    failed = last(events, "StepFailed")
    assert failed.step == "vm-creation" and failed.error.code == "VM_NAME_TAKEN"
    assert twin_job.row.job_id in failed.error.message
    assert last(events, "JobFailed").rolled_back is True
    warned = [e for e in events if e.type == "LogRecorded" and e.level == "WARN"
              and f"held by job {twin_job.row.job_id}" in e.message]
    assert len(warned) == 1 and "remove it by hand" in warned[0].message  # said once, not by every undo step
    other = h.world.vms[made[0]]
    assert not other.destroyed and other.state == "Running" and h.world.attached(other.id) == []
    assert h.world.observable()["volumes"] == before["volumes"]  # the job's volumes are back


async def test_a_vm_of_the_jobs_name_and_another_display_name_is_never_taken_for_its_own(
        h: Harness, machine: AsyncMachine) -> None:
    """Between the job's intent and its deploy's retry a VM of its name appears, made for another
    source VM (or by hand): its display name is not the job's source VM's name, so the retry does
    not adopt it (CloudStack then refuses the deploy: the name is taken) and the rollback leaves
    it as it was."""
    vm = h.seed_vm("db 02", os_type="Linux", disks=1)
    name = sanitize_vm_name(vm.vm_name)
    made: list[str] = []

    def someone_deploys(store: FakeJobStore) -> None:
        other = h.world.add_vm(name, "Running")
        other.display_name = "db_02"
        made.append(other.id)

    h.store.hooks.append(_on_vm_intent(someone_deploys))  # type: ignore[arg-type]
    h.faults.add("deployVirtualMachine", "transient")
    ctx = h.new_job(vm, "live-failover")
    assert await drive(machine, ctx) == "failed"
    events = h.events(ctx.row.job_id)
    assert last(events, "StepFailed").step == "vm-creation"
    assert last(events, "JobFailed").rolled_back is True
    other = h.world.vms[made[0]]
    assert not other.destroyed and other.state == "Running" and h.world.attached(other.id) == []


async def test_a_live_failover_whose_name_a_vm_has_already_fails_validation_before_writing_anything(
        h: Harness, machine: AsyncMachine) -> None:
    """A live VM's name is the source VM's alone: a VM of that name in CloudStack now (made by
    hand, or left by another platform) is found by the validation, before the snapshots and the
    injection's write to the root (on storage that cannot revert, a full re-sync)."""
    vm = h.seed_vm("app 07", os_type="Windows Server 2019", disks=2)
    there = h.world.add_vm(sanitize_vm_name(vm.vm_name), "Stopped")
    before = h.world.observable()
    ctx = h.new_job(vm, "live-failover")
    assert await drive(machine, ctx) == "failed"
    failed = last(h.events(ctx.row.job_id), "StepFailed")
    assert (failed.step, failed.error.code) == ("pre-failover-validation", "VM_NAME_TAKEN")
    assert there.id in failed.error.message and "nothing was changed" in failed.error.message
    assert h.world.observable() == before
    assert [op for op, _ in h.cloudstack.calls if op in ("createSnapshot", "deployVirtualMachine")] == []
