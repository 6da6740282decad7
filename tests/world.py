"""Reading the emulated world for assertions: "is it exactly as before the failover?"."""

from __future__ import annotations

from typing import Any

from emulators.client import EmulatorControl


def _items(value: Any) -> list[dict[str, Any]]:
    return list(value.values()) if isinstance(value, dict) else list(value)


async def view(control: EmulatorControl, volume_ids: list[str], appliance_vm_id: str) -> dict[str, Any]:
    """What a failover of these volumes may change, in comparable form."""
    world = await control.state()
    volumes = {v["id"]: v for v in _items(world["volumes"])}
    mine = [volumes[v] for v in volume_ids]
    on_appliance = sorted((v.get("deviceid", -1), v["id"]) for v in mine
                          if v.get("virtualmachineid") == appliance_vm_id)
    return {
        "vms": sorted(v["id"] for v in _items(world["vms"])
                      if v.get("state") not in ("Destroyed", "Expunging", "Expunged") and not v.get("destroyed")),
        "snapshots": sorted(s["id"] for s in _items(world["snapshots"])
                            if s.get("volumeid") in volume_ids and not s.get("destroyed")),
        "destroyed": sorted(v["id"] for v in mine if v.get("destroyed")),
        "holders": {v["id"]: v.get("virtualmachineid") for v in mine},
        "order": [vid for _, vid in on_appliance],
        "content": {v["id"]: v.get("content") for v in mine},
    }


def assert_restored(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Guarantee 4: no VM added, no snapshot left, no volume destroyed, every replica back on
    the appliance in its original relative order with its pre-failover content."""
    assert after["vms"] == before["vms"], "a VM was left behind"
    assert after["snapshots"] == [], f"snapshots left: {after['snapshots']}"
    assert after["destroyed"] == [], f"replicated volumes destroyed: {after['destroyed']}"
    assert after["holders"] == before["holders"], "a volume is not back on the appliance"
    assert after["order"] == before["order"], "the volumes' order on the appliance changed"
    assert after["content"] == before["content"], "a volume's content was not reverted"
