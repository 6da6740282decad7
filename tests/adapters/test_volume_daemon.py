"""VolumeDaemonAdapter against the Volume Daemon emulator over real HTTP: volume lookups,
attach / attach-root / detach operations, and every error translated."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from adapters.volume_daemon import VolumeDaemonAdapter
from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from statemachine.errors import MalformedResponse, NotFound, RefusedError, StepError, TransientError
from statemachine.ports import DaemonOperation, DaemonVolume

from .conftest import DaemonFactory
from .helpers import Observed, closed_port_url, world_item


async def on_appliance(control: EmulatorControl, emu: EmulatorHandle, name: str = "replica") -> str:
    return str((await control.create_volume(name, 10, vm_id=emu.appliance_vm_id))["id"])


async def done(daemon: VolumeDaemonAdapter, operation: str) -> DaemonOperation:
    result = await daemon.wait_operation(operation, timeout=5)
    assert result.status == "completed", result
    return result


# -------------------------------------------------------------------------------- get_volume

async def test_get_volume_on_the_appliance_has_a_device_path(daemon: VolumeDaemonAdapter,
                                                             emu: EmulatorHandle,
                                                             control: EmulatorControl) -> None:
    first = await on_appliance(control, emu, "first")
    second = await on_appliance(control, emu, "second")
    assert await daemon.get_volume(first) == DaemonVolume(
        volume_id=first, vm_id=emu.appliance_vm_id, device_id=1, device_path="/dev/vdb", type="DATADISK")
    volume = await daemon.get_volume(second)
    assert (volume.device_id, volume.device_path) == (2, "/dev/vdc")
    [call, _] = await control.calls(api="volume-daemon")
    assert call["command"] == "get-volume" and call["params"] == {"volume_id": first}


async def test_get_volume_elsewhere_has_no_device_path(daemon: VolumeDaemonAdapter,
                                                       control: EmulatorControl) -> None:
    other = await control.create_vm("other-vm", state="Stopped")
    root = await control.create_volume("other-root", 10, vm_id=other["id"], device_id=0)
    detached = await control.create_volume("loose", 10)
    assert await daemon.get_volume(root["id"]) == DaemonVolume(
        volume_id=root["id"], vm_id=other["id"], device_id=0, device_path=None, type="ROOT")
    assert await daemon.get_volume(detached["id"]) == DaemonVolume(
        volume_id=detached["id"], vm_id=None, device_id=None, device_path=None, type="DATADISK")


# ---------------------------------------------------------------------------- the operations

async def test_detach_then_attach_to_another_vm(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                                control: EmulatorControl) -> None:
    volume_id = await on_appliance(control, emu)
    vm = await control.create_vm("target", state="Stopped")

    operation = await daemon.detach(volume_id)
    assert isinstance(operation, str) and operation
    detached = await done(daemon, operation)
    assert detached == DaemonOperation(id=operation, status="completed", error=None,
                                       device_id=None, device_path=None)
    volume = await daemon.get_volume(volume_id)
    assert (volume.vm_id, volume.device_id, volume.device_path) == (None, None, None)

    operation = await daemon.attach(volume_id, vm["id"])
    attached = await done(daemon, operation)
    assert (attached.device_id, attached.device_path) == (1, None)  # not on the appliance: no path
    volume = await daemon.get_volume(volume_id)
    assert (volume.vm_id, volume.device_id, volume.type) == (vm["id"], 1, "DATADISK")

    calls = await control.calls(api="volume-daemon")
    assert [(c["command"], c["params"]) for c in calls if c["command"] in ("detach", "attach")] == [
        ("detach", {"volume_id": volume_id}), ("attach", {"volume_id": volume_id, "vm_id": vm["id"]})]


async def test_attach_back_to_the_appliance_gives_a_device_path(daemon: VolumeDaemonAdapter,
                                                                emu: EmulatorHandle,
                                                                control: EmulatorControl) -> None:
    volume_id = await on_appliance(control, emu)
    await done(daemon, await daemon.detach(volume_id))
    attached = await done(daemon, await daemon.attach(volume_id, emu.appliance_vm_id))
    assert (attached.device_id, attached.device_path) == (1, "/dev/vdb")


async def test_attach_root_makes_the_volume_root(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                                 control: EmulatorControl) -> None:
    volume_id = await on_appliance(control, emu)
    vm = await control.create_vm("target", state="Stopped")
    await done(daemon, await daemon.detach(volume_id))
    operation = await daemon.attach_root(volume_id, vm["id"])
    attached = await done(daemon, operation)
    assert attached.device_id == 0
    volume = await daemon.get_volume(volume_id)
    assert (volume.vm_id, volume.device_id, volume.type) == (vm["id"], 0, "ROOT")
    [call] = await control.calls(api="volume-daemon", command="attach-root")
    assert call["params"] == {"volume_id": volume_id, "vm_id": vm["id"]}


async def test_slow_operation_is_waited_for(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                            control: EmulatorControl) -> None:
    volume_id = await on_appliance(control, emu)
    await control.set_latency(operation_seconds=0.2)
    operation = await daemon.detach(volume_id)
    await done(daemon, operation)
    assert len(await control.calls(api="volume-daemon", command="get-operation")) >= 2


async def test_operation_that_breaks_a_rule_fails(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                                  control: EmulatorControl) -> None:
    # device 0 only on a stopped VM: the daemon accepts the request, the operation fails
    volume_id = await on_appliance(control, emu)
    running = await control.create_vm("running-vm", state="Running")
    await done(daemon, await daemon.detach(volume_id))
    operation = await daemon.attach_root(volume_id, running["id"])
    result = await daemon.wait_operation(operation, timeout=5)
    assert result.status == "failed"
    assert result.error and "stopped" in result.error
    assert (await daemon.get_volume(volume_id)).vm_id is None


async def test_async_fail_fault_fails_the_operation(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                                    control: EmulatorControl) -> None:
    volume_id = await on_appliance(control, emu)
    await control.add_fault("volume-daemon", "async_fail", command="detach")
    operation = await daemon.detach(volume_id)
    result = await daemon.wait_operation(operation, timeout=5)
    assert result.status == "failed" and result.error and "Injected fault" in result.error
    assert (await daemon.get_volume(volume_id)).vm_id == emu.appliance_vm_id  # nothing moved


async def test_operation_timeout(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                 control: EmulatorControl) -> None:
    volume_id = await on_appliance(control, emu)
    await control.add_fault("volume-daemon", "timeout", command="detach")
    operation = await daemon.detach(volume_id)
    began = time.monotonic()
    with pytest.raises(StepError) as caught:
        await daemon.wait_operation(operation, timeout=0.3)
    assert caught.value.code == "VOLUME_OPERATION_TIMEOUT" and operation in caught.value.message
    assert not caught.value.transient and "FAILOVER_VOLUME_OPERATION_TIMEOUT_SECONDS" in caught.value.message
    assert 0.3 <= time.monotonic() - began < 1.5


async def test_hung_request_is_bounded_by_the_adapter_timeout(make_daemon: DaemonFactory,
                                                              emu: EmulatorHandle,
                                                              control: EmulatorControl) -> None:
    daemon = make_daemon(timeout=0.5)
    volume_id = await on_appliance(control, emu)
    await control.add_fault("volume-daemon", "timeout", command="get-volume")
    began = time.monotonic()
    with pytest.raises(TransientError) as caught:
        async with asyncio.timeout(5):  # the test's own bound
            await daemon.get_volume(volume_id)
    assert caught.value.code == "VOLUME_DAEMON_UNREACHABLE"
    assert time.monotonic() - began < 3


# ---------------------------------------------------------------------------------- errors

async def test_unknown_volume_is_a_404_refusal(daemon: VolumeDaemonAdapter, emu: EmulatorHandle) -> None:
    unknown = str(uuid.uuid4())
    for call in (daemon.get_volume(unknown), daemon.detach(unknown),
                 daemon.attach(unknown, emu.appliance_vm_id), daemon.wait_operation(unknown, 5)):
        with pytest.raises(RefusedError) as caught:
            await call
        assert isinstance(caught.value, NotFound)
        assert caught.value.code == "VOLUME_DAEMON_NOT_FOUND" and "404" in caught.value.message
        assert not caught.value.transient


async def test_unknown_vm_is_a_404_refusal(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                           control: EmulatorControl) -> None:
    volume = await control.create_volume("loose", 1)
    with pytest.raises(RefusedError) as caught:
        await daemon.attach_root(volume["id"], str(uuid.uuid4()))
    assert "404" in caught.value.message and "not found" in caught.value.message


async def test_refuse_fault_is_a_refusal(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                         control: EmulatorControl) -> None:
    volume_id = await on_appliance(control, emu)
    await control.add_fault("volume-daemon", "refuse", command="detach")
    with pytest.raises(RefusedError) as caught:
        await daemon.detach(volume_id)
    assert "409" in caught.value.message


@pytest.mark.parametrize("command", ["get-volume", "detach", "get-operation"])
async def test_server_error_is_transient(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                         control: EmulatorControl, command: str) -> None:
    volume_id = await on_appliance(control, emu)
    await control.add_fault("volume-daemon", "server_error", command=command)
    with pytest.raises(TransientError) as caught:
        await daemon.get_volume(volume_id)
        await daemon.wait_operation(await daemon.detach(volume_id), 5)
    assert caught.value.code == "VOLUME_DAEMON_ERROR" and "500" in caught.value.message


Call = Callable[[VolumeDaemonAdapter, dict[str, str]], Awaitable[object]]

CALLS: dict[str, tuple[str, Call]] = {
    "get_volume": ("get-volume", lambda d, ids: d.get_volume(ids["volume"])),
    "attach": ("attach", lambda d, ids: d.attach(ids["loose"], ids["vm"])),
    "attach_root": ("attach-root", lambda d, ids: d.attach_root(ids["loose"], ids["vm"])),
    "detach": ("detach", lambda d, ids: d.detach(ids["volume"])),
    "wait_operation": ("get-operation", lambda d, ids: d.wait_operation(ids["operation"], 5)),
}


@pytest.mark.parametrize("variant", ["truncated", "wrong_shape"])
@pytest.mark.parametrize("method", list(CALLS))
async def test_malformed_answer_is_malformed_response(daemon: VolumeDaemonAdapter, emu: EmulatorHandle,
                                                      control: EmulatorControl, method: str,
                                                      variant: str) -> None:
    loose = await control.create_volume("loose", 1)
    other = await control.create_volume("other", 1)
    vm = await control.create_vm("target", state="Stopped")
    ids: dict[str, Any] = {"volume": await on_appliance(control, emu), "loose": loose["id"],
                           "vm": vm["id"], "operation": await daemon.attach(other["id"], vm["id"])}
    command, call = CALLS[method]
    await control.add_fault("volume-daemon", "malformed", command=command, variant=variant)
    try:
        await call(daemon, ids)
    except MalformedResponse as exc:
        assert exc.code == "MALFORMED_RESPONSE" and "Volume Daemon" in exc.message
    except StepError as exc:  # pragma: no cover - the assertion says which
        pytest.fail(f"{method} under a {variant} answer raised {type(exc).__name__} {exc}")
    else:
        pytest.fail(f"{method} accepted a {variant} answer")
    [fault] = await control.faults()
    assert fault["fired"] == 1


async def test_unreachable_daemon_is_transient(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(base_url=closed_port_url())
    began = time.monotonic()
    with pytest.raises(TransientError) as caught:
        await daemon.get_volume(str(uuid.uuid4()))
    assert caught.value.code == "VOLUME_DAEMON_UNREACHABLE"
    assert "FAILOVER_VOLUME_DAEMON_URL" in caught.value.message
    assert time.monotonic() - began < 3


async def test_base_url_with_a_trailing_slash(make_daemon: DaemonFactory, emu: EmulatorHandle,
                                              control: EmulatorControl) -> None:
    daemon = make_daemon(base_url=emu.volume_daemon_url + "/")
    volume_id = await on_appliance(control, emu)
    assert (await daemon.get_volume(volume_id)).device_path == "/dev/vdb"


# ---------------------------------------------------------------------------------- observe

async def test_observe_is_called_per_request(make_daemon: DaemonFactory, emu: EmulatorHandle,
                                             control: EmulatorControl) -> None:
    observed = Observed()
    daemon = make_daemon(observe=observed)
    volume_id = await on_appliance(control, emu)
    await daemon.get_volume(volume_id)
    await done(daemon, await daemon.detach(volume_id))
    with pytest.raises(RefusedError):
        await daemon.get_volume(str(uuid.uuid4()))
    kinds = [c[:3] for c in observed.calls]
    assert kinds[:2] == [("volume_daemon", "get_volume", "ok"), ("volume_daemon", "detach", "ok")]
    assert set(kinds[2:-1]) == {("volume_daemon", "get_operation", "ok")}
    assert kinds[-1] == ("volume_daemon", "get_volume", "error")
    assert all(isinstance(c[3], float) and 0 <= c[3] < 5 for c in observed.calls)
    assert (await world_item(control, "volumes", volume_id))["vm_id"] is None


# --------------------------------------------- a proxy in front of the daemon answering by itself

async def test_proxy_pages_keep_their_meaning(make_daemon: DaemonFactory, proxy: Any) -> None:
    page = b"<html><body><h1>gateway says no</h1></body></html>"
    for status, error in ((502, TransientError), (503, TransientError), (404, RefusedError),
                          (200, MalformedResponse)):
        daemon = make_daemon(base_url=proxy(status, page))
        with pytest.raises(error) as caught:
            await daemon.get_volume(str(uuid.uuid4()))
        if status != 200:
            assert str(status) in caught.value.message and "gateway says no" in caught.value.message


async def test_undecodable_answer_is_malformed(make_daemon: DaemonFactory, proxy: Any) -> None:
    for body, ctype in ((b'{"volume_id": "\xff\xfe"}', "application/json; charset=utf-8"),
                        (b"", "application/json"), (b"[1, 2]", "application/json")):
        daemon = make_daemon(base_url=proxy(200, body, ctype))
        with pytest.raises(MalformedResponse):
            await daemon.get_volume(str(uuid.uuid4()))
