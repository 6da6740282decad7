"""A call whose answer is lost: CloudStack or the Volume Daemon did the command (its job or
operation runs) and the service got no answer (a proxy's 502: the emulators' `lost_answer`
fault). The step's retry comes while that work still runs (each takes 0.5 s, the retry 0.05 s
later), and must
neither do the work a second time nor fail on the first call's job: the test failover and its
cleanup complete, with one VM, one snapshot per volume and one attach per volume, and the
world is as before once cleaned up. (A crash between the call and its answer is the kill-point
tests' case, tests/crash/test_kill_points.py; the rollback's revert is
tests/test_e2e_lifecycle.py's.)"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from emulators.client import EmulatorControl
from emulators.runner import EmulatorHandle
from failover.client import BusClient
from failover.seed import seed_vm
from schemas.commands import CleanupRequested
from statemachine.naming import sanitize_vm_name, test_vm_name

from .crash.support import exactly_once_problems
from .helpers import ServeProcess, failover, run_command
from .world import assert_restored, view

FAILOVER_CALLS = [("cloudstack", "createSnapshot"), ("cloudstack", "deployVirtualMachine"),
                  ("cloudstack", "startVirtualMachine"), ("volume-daemon", "attach-root"),
                  ("volume-daemon", "attach")]
CLEANUP_CALLS = [("cloudstack", "stopVirtualMachine"), ("cloudstack", "destroyVirtualMachine"),
                 ("cloudstack", "deleteSnapshot"), ("volume-daemon", "detach")]


@pytest.mark.parametrize(("api", "command"), FAILOVER_CALLS + CLEANUP_CALLS,
                         ids=[c for _, c in FAILOVER_CALLS + CLEANUP_CALLS])
async def test_a_call_whose_answer_was_lost_is_not_made_twice_and_the_job_completes(
        serve: ServeProcess, bus: BusClient, db: Any, control: EmulatorControl, emulators: EmulatorHandle,
        api: str, command: str) -> None:
    vm = await seed_vm(db, control, emulators.appliance_vm_id, vm_name=f"lost {command}", disks=2,
                       test_network_id=emulators.test_network_id)
    before = await view(control, vm.volume_ids, emulators.appliance_vm_id)
    calls = len(await control.calls())
    job_id = uuid.uuid4()
    await control.set_latency(async_job_seconds=0.5, operation_seconds=0.5)
    try:
        if (api, command) in FAILOVER_CALLS:
            await control.add_fault(api=api, command=command, kind="lost_answer", times=1)
        events = await failover(bus, vm.vm_id, request_id=job_id, timeout=120)
        assert events[-1].type == "JobCompleted", [(e.type, getattr(e, "message", None)) for e in events[-4:]]
        name = test_vm_name(sanitize_vm_name(vm.vm_name), str(job_id))
        assert exactly_once_problems(emulators.world, name, vm.volume_ids, f"test-failover-{str(job_id)[:8]}") == []
        if (api, command) in CLEANUP_CALLS:
            await control.add_fault(api=api, command=command, kind="lost_answer", times=1)
        cleanup_id = uuid.uuid4()
        cleaned = await run_command(bus, CleanupRequested(request_id=cleanup_id, failover_job_id=job_id), cleanup_id,
                                    120)
        assert cleaned[-1].type == "JobCompleted", [(e.type, getattr(e, "message", None)) for e in cleaned[-4:]]
    finally:
        await control.set_latency(async_job_seconds=0, operation_seconds=0)
        await control.clear_faults()
    lost = [c for c in (await control.calls())[calls:] if c["command"] == command and c["status"] == 502]
    assert len(lost) == 1  # the fault did fire
    assert_restored(before, await view(control, vm.volume_ids, emulators.appliance_vm_id))
