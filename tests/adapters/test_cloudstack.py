"""CloudStackAdapter against the CloudStack emulator over real HTTP: signed requests, async
jobs, CloudStack's rules, and every error translated into the engine's errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from adapters.cloudstack import CloudStackAdapter
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from statemachine.errors import (
    OUTAGE_CODES,
    MalformedResponse,
    RefusedError,
    StepError,
    TransientError,
)
from statemachine.ports import AsyncStart, CsSnapshot, DeploySpec

from .conftest import CloudStackFactory
from .helpers import Observed, closed_port_url, world_item


def is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


async def appliance_volume(control: EmulatorControl, emu: EmulatorHandle, name: str = "disk-0",
                           content: str | None = None) -> str:
    volume = await control.create_volume(name, 10, vm_id=emu.appliance_vm_id, content=content)
    return str(volume["id"])


def spec(emu: EmulatorHandle, name: str = "test-vm-1", **overrides: Any) -> DeploySpec:
    args: dict[str, Any] = {
        "name": name, "display_name": f"{name} (test failover)", "zone_id": emu.zone_id,
        "template_id": emu.template_id, "service_offering_id": emu.service_offering_id,
        "disk_offering_id": None, "network_ids": [emu.test_network_id, emu.network_id],
        "cpu_count": 4, "memory_mb": 8192,
    }
    args.update(overrides)
    return DeploySpec(**args)


async def snapshot_of(cs: CloudStackAdapter, volume_id: str, name: str) -> CsSnapshot:
    started = await cs.create_snapshot(volume_id, name)
    await cs.wait_job(started.job_id, timeout=5)
    assert started.resource_id is not None
    snapshot = await cs.get_snapshot(started.resource_id)
    assert snapshot is not None
    return snapshot


async def deployed(cs: CloudStackAdapter, emu: EmulatorHandle, name: str = "test-vm-1",
                   **overrides: Any) -> str:
    started = await cs.deploy_vm(spec(emu, name, **overrides))
    await cs.wait_job(started.job_id, timeout=5)
    assert started.resource_id is not None
    return started.resource_id


# ------------------------------------------------------------------------------------- zones

async def test_resolve_zone_by_name(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                    control: EmulatorControl) -> None:
    assert await cloudstack.resolve_zone(emu.zone_name) == emu.zone_id
    [call] = await control.calls(api="cloudstack")
    assert call["command"] == "listZones" and call["params"] == {"name": emu.zone_name}
    assert call["status"] == 200
    # resolved once per adapter
    assert await cloudstack.resolve_zone(emu.zone_name) == emu.zone_id
    assert len(await control.calls(api="cloudstack")) == 1


async def test_resolve_zone_by_uuid_makes_no_call(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                                  control: EmulatorControl) -> None:
    assert await cloudstack.resolve_zone(emu.zone_id) == emu.zone_id
    assert await control.calls(api="cloudstack") == []


async def test_unknown_zone_is_refused(cloudstack: CloudStackAdapter) -> None:
    with pytest.raises(RefusedError) as caught:
        await cloudstack.resolve_zone("no-such-zone")
    assert caught.value.code == "ZONE_NOT_FOUND"
    assert "no-such-zone" in caught.value.message and "FAILOVER_ZONE" in caught.value.message
    assert not caught.value.transient


# --------------------------------------------------------------------------------- snapshots

async def test_create_snapshot_wait_get_and_find(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                                 control: EmulatorControl) -> None:
    volume_id = await appliance_volume(control, emu, content="replica")
    started = await cloudstack.create_snapshot(volume_id, "failover-snap-1")
    assert isinstance(started, AsyncStart)
    assert is_uuid(started.resource_id) and is_uuid(started.job_id)
    assert started.resource_id != started.job_id
    [call] = await control.calls(api="cloudstack", command="createSnapshot")
    assert call["params"] == {"volumeid": volume_id, "name": "failover-snap-1"}

    result = await cloudstack.wait_job(started.job_id, timeout=5)
    assert result["snapshot"]["id"] == started.resource_id

    assert started.resource_id is not None
    snapshot = await cloudstack.get_snapshot(started.resource_id)
    assert snapshot == CsSnapshot(id=started.resource_id, name="failover-snap-1", volume_id=volume_id,
                                  state="BackedUp", revertable=True)
    # the job's result holds the same snapshot: the step needs no listSnapshots after the wait
    assert cloudstack.snapshot_in(result) == snapshot
    assert cloudstack.snapshot_in({}) is None
    assert cloudstack.snapshot_in({"snapshot": {"id": snapshot.id, "state": "BackedUp"}}) is None  # not whole
    assert (await world_item(control, "snapshots", snapshot.id))["content"] == "replica"

    assert await cloudstack.find_snapshot("failover-snap-1", volume_id) == snapshot
    assert await cloudstack.find_snapshot("failover-snap-2", volume_id) is None


async def test_find_snapshot_matches_the_exact_name_only(cloudstack: CloudStackAdapter,
                                                         emu: EmulatorHandle,
                                                         control: EmulatorControl) -> None:
    # CloudStack's listSnapshots name= is a substring match: the adapter must not take a longer name
    volume_id = await appliance_volume(control, emu)
    longer = await snapshot_of(cloudstack, volume_id, "snap-a-retry")
    assert await cloudstack.find_snapshot("snap-a", volume_id) is None
    exact = await snapshot_of(cloudstack, volume_id, "snap-a")
    found = await cloudstack.find_snapshot("snap-a", volume_id)
    assert found is not None and found.id == exact.id != longer.id


async def test_find_snapshot_is_per_volume(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                           control: EmulatorControl) -> None:
    first = await appliance_volume(control, emu, "disk-0")
    second = await appliance_volume(control, emu, "disk-1")
    mine = await snapshot_of(cloudstack, first, "same-name")
    assert await cloudstack.find_snapshot("same-name", second) is None
    assert await cloudstack.find_snapshot("same-name", first) == mine


async def test_deleted_snapshot_is_gone(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                        control: EmulatorControl) -> None:
    volume_id = await appliance_volume(control, emu)
    snapshot = await snapshot_of(cloudstack, volume_id, "doomed")
    started = await cloudstack.delete_snapshot(snapshot.id)
    assert started.resource_id is None and is_uuid(started.job_id)
    await cloudstack.wait_job(started.job_id, timeout=5)
    assert await cloudstack.get_snapshot(snapshot.id) is None
    assert await cloudstack.find_snapshot("doomed", volume_id) is None


async def test_revert_snapshot_restores_the_content(cloudstack: CloudStackAdapter,
                                                    control: EmulatorControl) -> None:
    vm = await control.create_vm("scratch", state="Stopped")
    volume = await control.create_volume("scratch-root", 10, vm_id=vm["id"], device_id=0,
                                         content="before")
    snapshot = await snapshot_of(cloudstack, volume["id"], "before-boot")
    await cloudstack.wait_job((await cloudstack.start_vm(vm["id"])).job_id, timeout=5)
    assert (await world_item(control, "volumes", volume["id"]))["content"] != "before"  # booted
    # only onto a volume whose VM is stopped: CloudStack takes the call, and its job fails
    with pytest.raises(StepError, match="not in the shutdown state") as refused:
        await cloudstack.wait_job((await cloudstack.revert_snapshot(snapshot.id)).job_id, timeout=5)
    assert refused.value.failed_job is not None
    await cloudstack.wait_job((await cloudstack.stop_vm(vm["id"])).job_id, timeout=5)
    assert await cloudstack.volume_state(volume["id"]) == "Ready"
    await control.set_latency(async_job_seconds=0.5)
    try:
        started = await cloudstack.revert_snapshot(snapshot.id)
        # while it runs the volume is RevertSnapshotting, and a second revert's job fails
        assert await cloudstack.volume_state(volume["id"]) == "RevertSnapshotting"
        with pytest.raises(StepError, match="not in Ready state"):
            await cloudstack.wait_job((await cloudstack.revert_snapshot(snapshot.id)).job_id, timeout=5)
    finally:
        await control.set_latency(async_job_seconds=0)
    assert started.resource_id is None and is_uuid(started.job_id)
    await cloudstack.wait_job(started.job_id, timeout=5)
    assert (await world_item(control, "volumes", volume["id"]))["content"] == "before"
    assert await cloudstack.volume_state(volume["id"]) == "Ready"
    removed = await control.create_volume("removed", 1)
    await cloudstack.delete_volume(removed["id"])
    assert await cloudstack.volume_state(removed["id"]) is None  # (listed no more)


async def test_not_revertable_fault(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                    control: EmulatorControl) -> None:
    volume_id = await appliance_volume(control, emu)
    await control.add_fault("cloudstack", "not_revertable", command="createSnapshot")
    snapshot = await snapshot_of(cloudstack, volume_id, "on-ceph")
    assert snapshot.state == "BackedUp" and snapshot.revertable is False
    found = await cloudstack.find_snapshot("on-ceph", volume_id)
    assert found is not None and found.revertable is False
    with pytest.raises(StepError, match="not revertable"):  # CloudStack takes the revert; its job fails at once
        await cloudstack.wait_job((await cloudstack.revert_snapshot(snapshot.id)).job_id, timeout=5)


async def test_async_fail_is_a_transient_job_failure(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                                     control: EmulatorControl) -> None:
    volume_id = await appliance_volume(control, emu)
    await control.add_fault("cloudstack", "async_fail", command="createSnapshot")
    started = await cloudstack.create_snapshot(volume_id, "will-fail")
    assert started.resource_id is not None
    with pytest.raises(TransientError) as caught:
        await cloudstack.wait_job(started.job_id, timeout=5)
    assert caught.value.code == "CLOUDSTACK_JOB_FAILED"
    assert started.job_id in caught.value.message and "Injected fault" in caught.value.message
    # the failed snapshot is in Error: a resumed step does not take it for a good one
    failed = await cloudstack.get_snapshot(started.resource_id)
    assert failed is not None and failed.state == "Error"
    assert await cloudstack.find_snapshot("will-fail", volume_id) is None
    # ... but the cleanup of a resumed step still sees it
    assert await cloudstack.find_snapshots("will-fail", volume_id) == [failed]


async def test_job_timeout_within_the_given_timeout(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                                    control: EmulatorControl) -> None:
    volume_id = await appliance_volume(control, emu)
    await control.add_fault("cloudstack", "timeout", command="createSnapshot")
    started = await cloudstack.create_snapshot(volume_id, "never-done")
    began = time.monotonic()
    with pytest.raises(StepError) as caught:
        await cloudstack.wait_job(started.job_id, timeout=0.3)
    elapsed = time.monotonic() - began
    assert caught.value.code == "CLOUDSTACK_JOB_TIMEOUT" and not caught.value.transient  # (not waited again)
    assert started.job_id in caught.value.message and "FAILOVER_ASYNC_JOB_TIMEOUT_SECONDS" in caught.value.message
    assert 0.3 <= elapsed < 1.5
    polls = await control.calls(api="cloudstack", command="queryAsyncJobResult")
    assert len(polls) >= 2 and all(p["params"] == {"jobid": started.job_id} for p in polls)


async def test_slow_job_is_waited_for(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                      control: EmulatorControl) -> None:
    volume_id = await appliance_volume(control, emu)
    await control.set_latency(async_job_seconds=0.2)
    started = await cloudstack.create_snapshot(volume_id, "slow")
    result = await cloudstack.wait_job(started.job_id, timeout=5)
    assert result["snapshot"]["state"] == "BackedUp"
    assert len(await control.calls(command="queryAsyncJobResult")) >= 2


async def test_hung_request_is_bounded_by_the_adapter_timeout(make_cloudstack: CloudStackFactory,
                                                              emu: EmulatorHandle,
                                                              control: EmulatorControl) -> None:
    # a synchronous command that never answers: the adapter's own timeout must end the wait
    cloudstack = make_cloudstack(timeout=0.5)
    await control.add_fault("cloudstack", "timeout", command="listVirtualMachines")
    began = time.monotonic()
    with pytest.raises(TransientError) as caught:
        async with asyncio.timeout(5):  # the test's own bound: a TimeoutError here is the bug
            await cloudstack.get_vm(emu.appliance_vm_id)
    assert caught.value.code == "CLOUDSTACK_UNREACHABLE"
    assert time.monotonic() - began < 3


@pytest.mark.parametrize("command", ["createSnapshot", "listSnapshots", "queryAsyncJobResult"])
async def test_refuse_is_a_refusal(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                   control: EmulatorControl, command: str) -> None:
    volume_id = await appliance_volume(control, emu)
    await control.add_fault("cloudstack", "refuse", command=command)
    with pytest.raises(RefusedError) as caught:
        started = await cloudstack.create_snapshot(volume_id, "refused")
        assert started.resource_id is not None
        await cloudstack.get_snapshot(started.resource_id)
        await cloudstack.wait_job(started.job_id, timeout=5)
    assert caught.value.code == "CLOUDSTACK_REFUSED"
    assert "431" in caught.value.message and "Injected fault" in caught.value.message
    assert not caught.value.transient


async def test_parameter_error_is_a_refusal(cloudstack: CloudStackAdapter) -> None:
    with pytest.raises(RefusedError) as caught:
        await cloudstack.create_snapshot(str(uuid.uuid4()), "no-volume")
    assert caught.value.code == "CLOUDSTACK_REFUSED" and "volumeid" in caught.value.message


@pytest.mark.parametrize("command", ["createSnapshot", "listSnapshots", "queryAsyncJobResult"])
async def test_server_error_is_transient(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                         control: EmulatorControl, command: str) -> None:
    volume_id = await appliance_volume(control, emu)
    await control.add_fault("cloudstack", "server_error", command=command)
    with pytest.raises(TransientError) as caught:
        started = await cloudstack.create_snapshot(volume_id, "oops")
        assert started.resource_id is not None
        await cloudstack.get_snapshot(started.resource_id)
        await cloudstack.wait_job(started.job_id, timeout=5)
    assert caught.value.code == "CLOUDSTACK_ERROR"
    assert "530" in caught.value.message
    assert caught.value.transient


@pytest.mark.parametrize(("errorcode", "kind", "code", "advice"), [
    (531, RefusedError, "CLOUDSTACK_PERMISSION_DENIED", "give that account access"),
    (533, TransientError, "CLOUDSTACK_NO_CAPACITY", "free capacity in the zone"),
    (535, TransientError, "CLOUDSTACK_RESOURCE_LIMIT", "updateResourceLimit"),
    (532, TransientError, "CLOUDSTACK_RESOURCE_LIMIT", "updateResourceLimit"),
])
async def test_server_errors_no_outage_explains_are_not_ridden_out_as_one(
        cloudstack: CloudStackAdapter, emu: EmulatorHandle, control: EmulatorControl,
        errorcode: int, kind: type[StepError], code: str, advice: str) -> None:
    """A permission denied (531), no capacity (533) or the account's resource limit (535) is no
    outage: the step tries it its attempts alone (or not again), not through the retry window,
    and the message says what to do."""
    await control.add_fault("cloudstack", "server_error", command="deployVirtualMachine", errorcode=errorcode)
    with pytest.raises(StepError) as caught:
        await cloudstack.deploy_vm(spec(emu))
    assert type(caught.value) is kind and caught.value.code == code
    assert f"({errorcode})" in caught.value.message and advice in caught.value.message
    assert code not in OUTAGE_CODES


@pytest.mark.parametrize(("errorcode", "kind", "code"), [
    (531, RefusedError, "CLOUDSTACK_PERMISSION_DENIED"),
    (533, TransientError, "CLOUDSTACK_NO_CAPACITY"),
    (535, TransientError, "CLOUDSTACK_RESOURCE_LIMIT"),
    (530, TransientError, "CLOUDSTACK_JOB_FAILED"),
])
@pytest.mark.parametrize("wait", ["asked", "listed"])
async def test_an_async_job_failed_with_the_commands_own_code_is_told_apart(
        make_cloudstack: CloudStackFactory, emu: EmulatorHandle, control: EmulatorControl,
        errorcode: int, kind: type[StepError], code: str, wait: str) -> None:
    """CloudStack fails a deploy for want of capacity or past a resource limit in its async
    job, with the command's code in the job's result: the failure says which, asked about on
    its own or found in a poll round's listing, and names the job (what it made is in Error)."""
    adapter = make_cloudstack(batch_from=1 if wait == "listed" else 1000, poll_interval=0.05)
    await control.set_latency(async_job_seconds=0.3)
    await control.add_fault("cloudstack", "async_fail", command="deployVirtualMachine", errorcode=errorcode)
    started = await adapter.deploy_vm(spec(emu))
    with pytest.raises(StepError) as caught:
        await adapter.wait_job(started.job_id, timeout=10)
    assert type(caught.value) is kind and caught.value.code == code
    assert caught.value.failed_job == started.job_id
    assert started.job_id in caught.value.message and "DeployVMCmd" in caught.value.message
    assert code == "CLOUDSTACK_JOB_FAILED" or f"({errorcode})" in caught.value.message
    assert code not in OUTAGE_CODES
    assert started.resource_id is not None
    vm = await adapter.get_vm(started.resource_id)
    assert vm is not None and vm.state == "Error"


# --------------------------------------------------------------- malformed answers, everywhere

Call = Callable[[CloudStackAdapter, dict[str, str]], Awaitable[object]]

CALLS: dict[str, tuple[str, Call]] = {
    "resolve_zone": ("listZones", lambda cs, ids: cs.resolve_zone("zone1")),
    "create_snapshot": ("createSnapshot", lambda cs, ids: cs.create_snapshot(ids["volume"], "s")),
    "wait_job": ("queryAsyncJobResult", lambda cs, ids: cs.wait_job(ids["job"], 5)),
    "get_snapshot": ("listSnapshots", lambda cs, ids: cs.get_snapshot(ids["snapshot"])),
    "find_snapshot": ("listSnapshots", lambda cs, ids: cs.find_snapshot("base", ids["volume"])),
    "revert_snapshot": ("revertSnapshot", lambda cs, ids: cs.revert_snapshot(ids["snapshot"])),
    "delete_snapshot": ("deleteSnapshot", lambda cs, ids: cs.delete_snapshot(ids["snapshot"])),
    "deploy_vm": ("deployVirtualMachine", lambda cs, ids: cs.deploy_vm(ids["spec"])),  # type: ignore[arg-type]
    "find_snapshots": ("listSnapshots", lambda cs, ids: cs.find_snapshots("base", ids["volume"])),
    "find_vm": ("listVirtualMachines", lambda cs, ids: cs.find_vm("test-vm-1")),
    "find_vms": ("listVirtualMachines", lambda cs, ids: cs.find_vms("test-vm-1")),
    "get_vm": ("listVirtualMachines", lambda cs, ids: cs.get_vm(ids["vm"])),
    "start_vm": ("startVirtualMachine", lambda cs, ids: cs.start_vm(ids["vm"])),
    "stop_vm": ("stopVirtualMachine", lambda cs, ids: cs.stop_vm(ids["vm"])),
    "destroy_vm": ("destroyVirtualMachine", lambda cs, ids: cs.destroy_vm(ids["vm"])),
    "list_vm_volumes": ("listVolumes", lambda cs, ids: cs.list_vm_volumes(ids["vm"])),
    "delete_volume": ("deleteVolume", lambda cs, ids: cs.delete_volume(ids["volume"])),
}


@pytest.mark.parametrize("variant", ["truncated", "wrong_shape"])
@pytest.mark.parametrize("method", list(CALLS))
async def test_malformed_answer_is_malformed_response(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                                      control: EmulatorControl, method: str,
                                                      variant: str) -> None:
    volume = await control.create_volume("base", 10)  # detached: deletable, snapshottable
    snapshot = await snapshot_of(cloudstack, volume["id"], "base")
    vm_id = await deployed(cloudstack, emu)
    pending = await cloudstack.create_snapshot(volume["id"], "pending")
    ids: dict[str, Any] = {"volume": volume["id"], "snapshot": snapshot.id, "vm": vm_id,
                           "job": pending.job_id, "spec": spec(emu, "test-vm-2")}
    command, call = CALLS[method]
    await control.add_fault("cloudstack", "malformed", command=command, variant=variant)
    try:
        await call(cloudstack, ids)
    except MalformedResponse as exc:
        assert exc.code == "MALFORMED_RESPONSE" and "CloudStack" in exc.message
    except StepError as exc:  # pragma: no cover - the assertion says which
        pytest.fail(f"{method} under a {variant} answer raised {type(exc).__name__} {exc}")
    else:
        pytest.fail(f"{method} accepted a {variant} answer")
    [fault] = await control.faults()
    assert fault["fired"] == 1


# ------------------------------------------------------------------------------------- VMs

async def test_deploy_vm_stopped_with_the_spec(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                               control: EmulatorControl) -> None:
    started = await cloudstack.deploy_vm(spec(emu, "win-2022-app", display_name="WIN 2022 app (test)"))
    assert is_uuid(started.resource_id) and is_uuid(started.job_id)
    [call] = await control.calls(command="deployVirtualMachine")
    assert call["params"]["startvm"] == "false"
    result = await cloudstack.wait_job(started.job_id, timeout=5)
    assert result["virtualmachine"]["id"] == started.resource_id

    assert started.resource_id is not None
    vm = await world_item(control, "vms", started.resource_id)
    assert vm["name"] == "win-2022-app" and vm["displayname"] == "WIN 2022 app (test)"
    assert vm["state"] == "Stopped"
    assert (vm["cpunumber"], vm["memory"]) == (4, 8192)
    assert (vm["zoneid"], vm["templateid"], vm["serviceofferingid"]) == (
        emu.zone_id, emu.template_id, emu.service_offering_id)
    assert [(n["networkid"], n["isdefault"]) for n in vm["nic"]] == [
        (emu.test_network_id, True), (emu.network_id, False)]

    found = await cloudstack.find_vm("win-2022-app")
    assert found is not None and (found.id, found.name, found.state) == (
        started.resource_id, "win-2022-app", "Stopped")
    assert await cloudstack.get_vm(started.resource_id) == found
    assert cloudstack.vm_in(result) == found  # the job's result holds the deployed VM
    assert cloudstack.vm_in({"virtualmachine": "?"}) is None
    volumes = await cloudstack.list_vm_volumes(started.resource_id)
    assert [(v.type, v.device_id, v.vm_id) for v in volumes] == [("ROOT", 0, started.resource_id)]


async def test_deploy_vm_with_a_disk_offering(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                              control: EmulatorControl) -> None:
    vm_id = await deployed(cloudstack, emu, disk_offering_id=emu.disk_offering_id)
    [call] = await control.calls(command="deployVirtualMachine")
    assert call["params"]["diskofferingid"] == emu.disk_offering_id
    volumes = sorted(await cloudstack.list_vm_volumes(vm_id), key=lambda v: v.device_id or 0)
    assert [(v.type, v.device_id) for v in volumes] == [("ROOT", 0), ("DATADISK", 1)]


async def test_deploy_vm_with_one_network(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                          control: EmulatorControl) -> None:
    vm_id = await deployed(cloudstack, emu, network_ids=[emu.network_id])
    vm = await world_item(control, "vms", vm_id)
    assert [n["networkid"] for n in vm["nic"]] == [emu.network_id]


async def test_deploy_vm_with_an_awkward_display_name(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                                      control: EmulatorControl) -> None:
    awkward = "Ops VM @ site/1 + a=b & c; 100% ünïcødé \"q\" 'p' #h ?x"
    vm_id = await deployed(cloudstack, emu, display_name=awkward)
    assert (await world_item(control, "vms", vm_id))["displayname"] == awkward


async def test_tilde_in_a_name_is_refused_before_any_call(cloudstack: CloudStackAdapter,
                                                          emu: EmulatorHandle,
                                                          control: EmulatorControl) -> None:
    with pytest.raises(StepError) as caught:
        await cloudstack.deploy_vm(spec(emu, display_name="home~ops"))
    assert caught.value.code == "INVALID_NAME"
    assert await control.calls(api="cloudstack") == []


async def test_bad_vm_name_is_a_refusal(cloudstack: CloudStackAdapter, emu: EmulatorHandle) -> None:
    with pytest.raises(RefusedError) as caught:
        await cloudstack.deploy_vm(spec(emu, "1-starts-with-a-digit"))
    assert caught.value.code == "CLOUDSTACK_REFUSED" and "Invalid name" in caught.value.message


async def test_find_vm_matches_the_exact_name_only(cloudstack: CloudStackAdapter,
                                                   emu: EmulatorHandle) -> None:
    # listVirtualMachines name= is a substring match too
    longer = await deployed(cloudstack, emu, "test-vm-10")
    assert await cloudstack.find_vm("test-vm-1") is None
    exact = await deployed(cloudstack, emu, "test-vm-1")
    found = await cloudstack.find_vm("test-vm-1")
    assert found is not None and found.id == exact != longer
    assert await cloudstack.find_vm("no-such-vm") is None


async def test_find_snapshots_exact_names_and_not_deleted(cloudstack: CloudStackAdapter,
                                                          emu: EmulatorHandle,
                                                          control: EmulatorControl) -> None:
    volume_id = await appliance_volume(control, emu)
    first = await snapshot_of(cloudstack, volume_id, "twice")
    second = await snapshot_of(cloudstack, volume_id, "twice")
    await snapshot_of(cloudstack, volume_id, "twice-longer")
    assert sorted(s.id for s in await cloudstack.find_snapshots("twice", volume_id)) == sorted(
        [first.id, second.id])
    await cloudstack.wait_job((await cloudstack.delete_snapshot(first.id)).job_id, timeout=5)
    assert await cloudstack.find_snapshots("twice", volume_id) == [second]
    assert await cloudstack.find_snapshots("none", volume_id) == []


async def test_failed_deploy_leaves_an_error_vm(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                                control: EmulatorControl) -> None:
    await control.add_fault("cloudstack", "async_fail", command="deployVirtualMachine")
    started = await cloudstack.deploy_vm(spec(emu))
    with pytest.raises(TransientError) as caught:
        await cloudstack.wait_job(started.job_id, timeout=5)
    assert caught.value.code == "CLOUDSTACK_JOB_FAILED"
    assert await cloudstack.find_vm("test-vm-1") is None
    [failed] = await cloudstack.find_vms("test-vm-1")
    assert (failed.id, failed.state) == (started.resource_id, "Error")
    # an Error VM can be destroyed; then it is gone from both lookups
    await cloudstack.wait_job((await cloudstack.destroy_vm(failed.id)).job_id, timeout=5)
    assert await cloudstack.find_vms("test-vm-1") == []
    assert await cloudstack.get_vm(failed.id) is None


async def test_start_stop_destroy(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                  control: EmulatorControl) -> None:
    vm_id = await deployed(cloudstack, emu, disk_offering_id=emu.disk_offering_id)
    [root, data] = sorted(await cloudstack.list_vm_volumes(vm_id), key=lambda v: v.device_id or 0)

    started = await cloudstack.start_vm(vm_id)
    assert started.resource_id is None and is_uuid(started.job_id)
    await cloudstack.wait_job(started.job_id, timeout=5)
    vm = await cloudstack.get_vm(vm_id)
    assert vm is not None and vm.state == "Running"

    stopped = await cloudstack.stop_vm(vm_id)
    [call] = await control.calls(command="stopVirtualMachine")
    assert call["params"] == {"id": vm_id, "forced": "true"}
    await cloudstack.wait_job(stopped.job_id, timeout=5)
    vm = await cloudstack.get_vm(vm_id)
    assert vm is not None and vm.state == "Stopped"

    destroyed = await cloudstack.destroy_vm(vm_id)
    [call] = await control.calls(command="destroyVirtualMachine")
    assert call["params"] == {"id": vm_id, "expunge": "true"}
    await cloudstack.wait_job(destroyed.job_id, timeout=5)
    assert await cloudstack.get_vm(vm_id) is None
    assert await cloudstack.find_vm("test-vm-1") is None
    assert await cloudstack.list_vm_volumes(vm_id) == []
    # the ROOT died with the VM; the data disk was detached and kept, and can be deleted
    assert (await world_item(control, "volumes", root.id))["destroyed"] is True
    kept = await world_item(control, "volumes", data.id)
    assert kept["destroyed"] is False and kept["vm_id"] is None
    await cloudstack.delete_volume(data.id)
    assert (await world_item(control, "volumes", data.id))["destroyed"] is True


async def test_a_replica_attached_as_root_dies_with_the_vm(cloudstack: CloudStackAdapter,
                                                           emu: EmulatorHandle,
                                                           control: EmulatorControl,
                                                           daemon: Any) -> None:
    # the DESIGN rule the volume-attachment and cleanup steps are built around
    replica = await appliance_volume(control, emu, "replica-root", content="windows")
    keeper = await appliance_volume(control, emu, "replica-data", content="data")
    vm_id = await deployed(cloudstack, emu)
    [template_root] = await cloudstack.list_vm_volumes(vm_id)
    op = await daemon.detach(template_root.id)
    assert (await daemon.wait_operation(op, 5)).status == "completed"
    await cloudstack.delete_volume(template_root.id)  # a detached volume: deletable
    assert (await world_item(control, "volumes", template_root.id))["destroyed"] is True
    for volume_id, attach in ((replica, daemon.attach_root), (keeper, daemon.attach)):
        op = await daemon.detach(volume_id)
        assert (await daemon.wait_operation(op, 5)).status == "completed"
        op = await attach(volume_id, vm_id)
        assert (await daemon.wait_operation(op, 5)).status == "completed"
    volumes = sorted(await cloudstack.list_vm_volumes(vm_id), key=lambda v: v.device_id or 0)
    assert [(v.id, v.type, v.device_id) for v in volumes] == [
        (replica, "ROOT", 0), (keeper, "DATADISK", 1)]

    destroyed = await cloudstack.destroy_vm(vm_id)
    await cloudstack.wait_job(destroyed.job_id, timeout=5)
    assert await cloudstack.list_vm_volumes(vm_id) == []
    assert (await world_item(control, "volumes", replica))["destroyed"] is True  # lost
    survivor = await world_item(control, "volumes", keeper)
    assert survivor["destroyed"] is False and survivor["content"] == "data"


async def test_start_without_a_root_is_refused(cloudstack: CloudStackAdapter, emu: EmulatorHandle,
                                               daemon: Any) -> None:
    vm_id = await deployed(cloudstack, emu)
    [root] = await cloudstack.list_vm_volumes(vm_id)
    op = await daemon.detach(root.id)
    await daemon.wait_operation(op, 5)
    with pytest.raises(RefusedError) as caught:
        await cloudstack.start_vm(vm_id)
    assert "ROOT" in caught.value.message


async def test_delete_volume_attached_is_refused_and_deleted_is_idempotent(
        cloudstack: CloudStackAdapter, emu: EmulatorHandle, control: EmulatorControl) -> None:
    attached = await appliance_volume(control, emu, "attached")
    with pytest.raises(RefusedError):
        await cloudstack.delete_volume(attached)
    assert (await world_item(control, "volumes", attached))["destroyed"] is False
    detached = await control.create_volume("detached", 1)
    await cloudstack.delete_volume(detached["id"])
    await cloudstack.delete_volume(detached["id"])  # already gone: done, not an error
    assert (await world_item(control, "volumes", detached["id"]))["destroyed"] is True


# ---------------------------------------------------------------------- auth and connectivity

async def test_wrong_secret_is_an_auth_refusal(make_cloudstack: CloudStackFactory, emu: EmulatorHandle,
                                               control: EmulatorControl) -> None:
    cloudstack = make_cloudstack(secret_key="not-the-secret")
    with pytest.raises(RefusedError) as caught:
        await cloudstack.resolve_zone(emu.zone_name)
    assert caught.value.code == "CLOUDSTACK_AUTH"
    assert "not-the-secret" not in str(caught.value)
    assert emu.secret_key not in str(caught.value)
    [call] = await control.calls(api="cloudstack")
    assert call["status"] == 401


async def test_unknown_api_key_is_an_auth_refusal(make_cloudstack: CloudStackFactory,
                                                  emu: EmulatorHandle) -> None:
    with pytest.raises(RefusedError) as caught:
        await make_cloudstack(api_key="nobody").get_vm(emu.appliance_vm_id)
    assert caught.value.code == "CLOUDSTACK_AUTH"


async def test_unreachable_cloudstack_is_transient(make_cloudstack: CloudStackFactory) -> None:
    cloudstack = make_cloudstack(endpoint=closed_port_url("/client/api"))
    began = time.monotonic()
    with pytest.raises(TransientError) as caught:
        await cloudstack.resolve_zone("zone1")
    assert caught.value.code == "CLOUDSTACK_UNREACHABLE"
    assert "FAILOVER_CLOUDSTACK_URL" in caught.value.message
    assert time.monotonic() - began < 3


async def test_a_wrong_path_is_malformed_not_a_crash(make_cloudstack: CloudStackFactory,
                                                     emu: EmulatorHandle) -> None:
    # the daemon's port answers JSON of another shape (a 404): nothing CloudStack-like
    cloudstack = make_cloudstack(endpoint=emu.volume_daemon_url + "/client/api")
    with pytest.raises(StepError) as caught:
        await cloudstack.get_vm(emu.appliance_vm_id)
    assert isinstance(caught.value, MalformedResponse | RefusedError)


# ---------------------------------------------------------------------------------- observe

async def test_observe_is_called_per_call(make_cloudstack: CloudStackFactory, emu: EmulatorHandle,
                                          control: EmulatorControl) -> None:
    observed = Observed()
    cloudstack = make_cloudstack(observe=observed)
    await cloudstack.resolve_zone(emu.zone_name)
    await control.add_fault("cloudstack", "refuse", command="listVirtualMachines")
    with pytest.raises(RefusedError):
        await cloudstack.get_vm(emu.appliance_vm_id)
    assert [c[:3] for c in observed.calls] == [
        ("cloudstack", "listZones", "ok"), ("cloudstack", "listVirtualMachines", "error")]
    assert all(isinstance(c[3], float) and 0 <= c[3] < 5 for c in observed.calls)


# ------------------------------------------- a proxy in front of CloudStack answering by itself

BAD_GATEWAY = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


async def test_proxy_5xx_page_is_transient(make_cloudstack: CloudStackFactory, proxy: Any) -> None:
    # CloudStack behind a reverse proxy being restarted: worth another try, not a broken system
    for status in (502, 503, 504):
        cloudstack = make_cloudstack(endpoint=proxy(status, BAD_GATEWAY) + "/client/api")
        with pytest.raises(TransientError) as caught:
            await cloudstack.get_vm(str(uuid.uuid4()))
        assert str(status) in caught.value.message


async def test_proxy_200_page_is_malformed(make_cloudstack: CloudStackFactory, proxy: Any) -> None:
    for body, ctype in ((b"<html>login</html>", "text/html"), (b'{"a": "\xff\xfe"}', "application/json"),
                        (b"", "application/json"), (b"null", "application/json")):
        cloudstack = make_cloudstack(endpoint=proxy(200, body, ctype) + "/client/api")
        with pytest.raises(MalformedResponse):
            await cloudstack.get_vm(str(uuid.uuid4()))


# --------------------------------------------------------------------------- the API limit


async def test_calls_past_the_accounts_api_limit_wait_for_its_window_and_all_succeed(
        make_cloudstack: CloudStackFactory, control: EmulatorControl) -> None:
    """CloudStack's API throttling (5 calls a second here): of 30 calls at once most are
    refused with 429 at first; each is made again once CloudStack's window has ended, and all
    of them succeed. Every refusal is counted once."""
    refusals: list[float] = []
    cs = make_cloudstack(timeout=10.0, on_throttled=lambda: refusals.append(time.monotonic()))
    await control.set_api_limit(5, interval_seconds=1.0)
    began = time.monotonic()
    found = await asyncio.gather(*(cs.find_vms(f"nobody-{i}") for i in range(30)))
    took = time.monotonic() - began
    assert found == [[]] * 30
    limit = await control.set_api_limit(0)  # (off again; its count stays)
    assert limit["refused"] > 0 and len(refusals) == limit["refused"], (limit, len(refusals))
    assert took >= 4.0, took  # 30 calls at 5 a window: at least 5 windows after the first
    answered = [c for c in await control.calls(api="cloudstack") if c["command"] == "listVirtualMachines"]
    assert sum(1 for c in answered if c["status"] == 200) == 30


async def test_a_pace_below_the_limit_is_never_refused(make_cloudstack: CloudStackFactory,
                                                       control: EmulatorControl) -> None:
    refusals: list[float] = []
    cs = make_cloudstack(timeout=10.0, max_calls_per_second=6.0, on_throttled=lambda: refusals.append(0.0))
    await control.set_api_limit(10, interval_seconds=1.0)
    began = time.monotonic()
    await asyncio.gather(*(cs.find_vms(f"nobody-{i}") for i in range(14)))
    took = time.monotonic() - began
    limit = await control.set_api_limit(0)
    assert limit["refused"] == 0 and refusals == []
    assert took >= 13 / 6.0 - 0.1, took  # spaced 1/6 s apart


async def test_a_wait_for_the_limit_longer_than_the_timeout_fails_at_once_as_throttled(
        make_cloudstack: CloudStackFactory, control: EmulatorControl) -> None:
    cs = make_cloudstack(timeout=2.0)
    await control.set_api_limit(1, interval_seconds=30.0)
    await cs.find_vms("first")  # the window's only call
    began = time.monotonic()
    with pytest.raises(TransientError) as caught:
        await cs.find_vms("second")
    assert time.monotonic() - began < 1.5  # not waited for: the window ends past the timeout
    assert caught.value.code == "CLOUDSTACK_THROTTLED"
    assert "API limit" in caught.value.message and "FAILOVER_CLOUDSTACK_MAX_CALLS_PER_SECOND" in caught.value.message
    await control.set_api_limit(0)
