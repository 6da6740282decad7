"""The fakes model the outside world's rules: if they did not, the engine tests would prove
nothing. (The same rules as emulators/world.py, checked here without HTTP.)"""

from __future__ import annotations

import pytest

from statemachine.errors import LeaseLost, RefusedError, StepError, TransientError
from statemachine.ports import Commit, DeploySpec, LedgerEntry
from tests.fakes import Harness, device_path_for


def _spec(h: Harness, name: str = "vm-1") -> DeploySpec:
    w = h.world
    return DeploySpec(name, name, w.zone_id, w.template_id, w.service_offering_id, None,
                      [w.default_network_id], 2, 2048)


async def _deployed(h: Harness, name: str = "vm-1") -> str:
    start = await h.cloudstack.deploy_vm(_spec(h, name))
    await h.cloudstack.wait_job(start.job_id, 1)
    assert start.resource_id is not None
    return start.resource_id


async def _op(h: Harness, op_id: str) -> str:
    return (await h.volumes.wait_operation(op_id, 1)).status


def test_device_paths() -> None:
    assert [device_path_for(i) for i in (0, 1, 25, 26, 27)] == [
        "/dev/vda", "/dev/vdb", "/dev/vdz", "/dev/vdaa", "/dev/vdab"]


async def test_deploy_makes_a_stopped_vm_with_a_template_root(h: Harness) -> None:
    vm_id = await _deployed(h)
    assert (await h.cloudstack.get_vm(vm_id)).state == "Stopped"  # type: ignore[union-attr]
    vols = await h.cloudstack.list_vm_volumes(vm_id)
    assert [(v.type, v.device_id) for v in vols] == [("ROOT", 0)]
    with pytest.raises(RefusedError, match="already exists"):
        await h.cloudstack.deploy_vm(_spec(h))
    with pytest.raises(RefusedError, match="Invalid name"):
        await h.cloudstack.deploy_vm(_spec(h, "1-bad"))


async def test_destroying_a_vm_destroys_its_root_and_keeps_data_disks(h: Harness) -> None:
    vm_id = await _deployed(h)
    data = h.world.add_volume("data", vm_id=vm_id)
    root = h.world.volume_at(vm_id, 0)
    start = await h.cloudstack.destroy_vm(vm_id)
    await h.cloudstack.wait_job(start.job_id, 1)
    assert root is not None and root.destroyed
    assert not data.destroyed and data.vm_id is None
    assert await h.cloudstack.get_vm(vm_id) is None


async def test_root_rules(h: Harness) -> None:
    vm_id = await _deployed(h)
    vol = h.world.add_volume("replica", vm_id=h.world.appliance.id)
    # device 0 is taken by the template's root
    assert await _op(h, await h.volumes.detach(vol.id)) == "completed"
    assert await _op(h, await h.volumes.attach_root(vol.id, vm_id)) == "failed"
    template_root = h.world.volume_at(vm_id, 0)
    assert template_root is not None
    assert await _op(h, await h.volumes.detach(template_root.id)) == "completed"
    assert template_root.type == "DATADISK"  # a detached ROOT is a data disk
    assert await _op(h, await h.volumes.attach_root(vol.id, vm_id)) == "completed"
    assert (vol.type, vol.device_id) == ("ROOT", 0)
    assert (await h.volumes.get_volume(vol.id)).device_path is None  # not on the appliance
    start = await h.cloudstack.start_vm(vm_id)
    await h.cloudstack.wait_job(start.job_id, 1)
    assert vol.content.endswith(f"boot:{vm_id}")
    # a ROOT leaves only a stopped VM; a second start is refused
    assert await _op(h, await h.volumes.detach(vol.id)) == "failed"
    with pytest.raises(RefusedError, match="already running"):
        await h.cloudstack.start_vm(vm_id)
    start = await h.cloudstack.stop_vm(vm_id)
    await h.cloudstack.wait_job(start.job_id, 1)
    assert await _op(h, await h.volumes.detach(vol.id)) == "completed"
    with pytest.raises(RefusedError, match="no ROOT"):
        await h.cloudstack.start_vm(vm_id)


async def test_data_disks_take_the_lowest_free_device_and_show_a_path_on_the_appliance(h: Harness) -> None:
    app = h.world.appliance.id
    a = h.world.add_volume("a", vm_id=app)
    b = h.world.add_volume("b", vm_id=app)
    assert (a.device_id, b.device_id) == (1, 2)
    assert (await h.volumes.get_volume(b.id)).device_path == "/dev/vdc"
    await h.volumes.detach(a.id)
    c = h.world.add_volume("c")
    op = await h.volumes.wait_operation(await h.volumes.attach(c.id, app), 1)
    assert (op.status, op.device_id, op.device_path) == ("completed", 1, "/dev/vdb")
    with pytest.raises(RefusedError, match="404"):
        await h.volumes.get_volume("no-such-volume")


async def test_revert_rules(h: Harness) -> None:
    app = h.world.appliance.id
    vol = h.world.add_volume("v", vm_id=app, content="before")
    start = await h.cloudstack.create_snapshot(vol.id, "snap")
    await h.cloudstack.wait_job(start.job_id, 1)
    snap = await h.cloudstack.get_snapshot(start.resource_id or "")
    assert snap is not None and (snap.state, snap.revertable) == ("BackedUp", True)
    h.world.write(vol, "after")
    # on the running appliance: taken, and its job fails (as CloudStack's: the rules are the job's)
    with pytest.raises(StepError, match="shutdown") as failed:
        await h.cloudstack.wait_job((await h.cloudstack.revert_snapshot(snap.id)).job_id, 1)
    assert failed.value.failed_job is not None
    await h.volumes.detach(vol.id)
    job = await h.cloudstack.revert_snapshot(snap.id)
    await h.cloudstack.wait_job(job.job_id, 1)
    assert vol.content == "before"
    other = h.world.add_volume("nr", revertable_storage=False)
    start = await h.cloudstack.create_snapshot(other.id, "nr-snap")
    await h.cloudstack.wait_job(start.job_id, 1)
    with pytest.raises(StepError, match="not revertable"):
        await h.cloudstack.wait_job((await h.cloudstack.revert_snapshot(start.resource_id or "")).job_id, 1)
    h.world.snapshots[start.resource_id or ""].destroyed = True
    with pytest.raises(RefusedError, match="Unable to find snapshot"):  # a deleted one: at the call
        await h.cloudstack.revert_snapshot(start.resource_id or "")


async def test_faults(h: Harness) -> None:
    vol = h.world.add_volume("v")
    h.faults.add("createSnapshot", "refused", nth=2)
    h.faults.add("createSnapshot", "transient", nth=3)
    h.faults.add("createSnapshot", "job_fail", nth=4)
    ok = await h.cloudstack.create_snapshot(vol.id, "s1")
    with pytest.raises(RefusedError):
        await h.cloudstack.create_snapshot(vol.id, "s2")
    with pytest.raises(TransientError):
        await h.cloudstack.create_snapshot(vol.id, "s3")
    failed = await h.cloudstack.create_snapshot(vol.id, "s4")
    await h.cloudstack.wait_job(ok.job_id, 1)
    with pytest.raises(TransientError, match="failed") as info:
        await h.cloudstack.wait_job(failed.job_id, 1)
    assert info.value.code == "CLOUDSTACK_JOB_FAILED"
    assert h.world.snapshots[failed.resource_id or ""].state == "Error"
    assert await h.cloudstack.find_snapshot("s4", vol.id) is None
    assert [s.state for s in await h.cloudstack.find_snapshots("s4", vol.id)] == ["Error"]
    assert h.cloudstack.count("createSnapshot") == 4


async def test_injection_writes_at_the_device_path(h: Harness) -> None:
    vol = h.world.add_volume("root", vm_id=h.world.appliance.id)
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    await h.injection.inject("/dev/vdb", "job-1", on_line)
    assert vol.content.endswith("virtio:job-1") and lines
    with pytest.raises(StepError, match="no /dev/vdq"):
        await h.injection.inject("/dev/vdq", "job-1", on_line)


async def test_store_commits_are_fenced_and_copied(h: Harness) -> None:
    vm = h.seed_vm("fence", disks=1)
    ctx = h.new_job(vm)
    entry = LedgerEntry("k", "vm", "create")
    assert await h.store.commit(ctx.row, Commit(ledger=[entry], job={"status": "x"})) is False
    entry.status = "done"  # what the caller still holds is not what the store has
    assert (await h.store.ledger(ctx.row.job_id))[0].status == "intended"
    h.store.request_cancel(ctx.row.job_id)
    assert await h.store.commit(ctx.row, Commit()) is True
    h.store.owner_ok = False
    with pytest.raises(LeaseLost):
        await h.store.commit(ctx.row, Commit(job={"status": "y"}))
    h.store.owner_ok = True
    stale = (await h.store.load(ctx.row.job_id))
    assert stale is not None and stale.status == "x"
    stale.last_sequence = 0
    with pytest.raises(LeaseLost):
        await h.store.commit(stale, Commit())
