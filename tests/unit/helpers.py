"""Assertions shared by the state machine's unit tests."""

from __future__ import annotations

from typing import Any

from schemas.events import Event
from tests.fakes import Harness, SeededVm


def assert_stream_ok(events: list[Event]) -> None:
    """Sequences 1, 2, 3, ... with no gap or repeat; exactly one terminal event, the last."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "JobAccepted"
    ends = [e.type for e in events if e.type in ("JobCompleted", "JobFailed", "JobCancelled")]
    assert len(ends) == 1, ends
    assert events[-1].type == ends[0]


def of_type(events: list[Event], type_name: str) -> list[Any]:
    return [e for e in events if e.type == type_name]


def last(events: list[Event], type_name: str) -> Any:
    found = of_type(events, type_name)
    assert found, f"no {type_name} in {[e.type for e in events]}"
    return found[-1]


def appliance_order(h: Harness, vm: SeededVm) -> list[str]:
    """The VM's volumes on the appliance, by device id."""
    on = [v for v in h.world.attached(h.world.appliance.id) if v.id in vm.volume_ids]
    return [v.id for v in on]


def assert_restored(h: Harness, before: dict[str, Any], vm: SeededVm, vm_status: str = "ready_for_failover") -> None:
    """The world is exactly as before the failover: no test VM, no snapshot, every volume back
    on the appliance where it was (same relative order, same content), none destroyed."""
    after = h.world.observable()
    assert after["vms"] == before["vms"]
    assert after["snapshots"] == before["snapshots"]
    assert after["volumes"] == before["volumes"]
    for vid in vm.volume_ids:
        assert not h.world.volumes[vid].destroyed
    assert h.platform.contexts[vm.vm_id].current_status == vm_status


def assert_failed_over(h: Harness, vm: SeededVm, vm_cs_id: str) -> None:
    """One VM (Running) holds the replicated volumes: root at device 0, then unit order; one
    BackedUp snapshot per volume; the template's root disk gone."""
    world = h.world
    vms = [v for v in world.live_vms() if v.id != world.appliance.id]
    assert [v.id for v in vms] == [vm_cs_id]
    assert vms[0].state == "Running"
    attached = world.attached(vm_cs_id)
    assert [v.id for v in attached] == vm.volume_ids
    assert [v.device_id for v in attached] == list(range(len(vm.volume_ids)))
    assert attached[0].type == "ROOT" and all(v.type == "DATADISK" for v in attached[1:])
    snaps = world.live_snapshots()
    assert sorted(s.volume_id for s in snaps) == sorted(vm.volume_ids)
    assert all(s.state == "BackedUp" for s in snaps)
    # nothing else than the replicas and the appliance's own disks is left
    others = [v for v in world.live_volumes() if v.id not in vm.volume_ids and v.vm_id != world.appliance.id]
    assert others == [], f"left-over volumes: {others}"
