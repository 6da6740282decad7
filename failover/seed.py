"""Seeding a replicated VM: its volumes on the appliance (in the emulated CloudStack) and its
rows in the platform tables, as MigrateKit's replication leaves them. Used by the demo, the
tests and the benchmark."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.engine import utcnow
from adapters.db.tables import (
    network_mappings,
    ossea_volumes,
    replication_jobs,
    vm_disks,
    vm_replication_contexts,
)
from emulators.client import EmulatorControl


@dataclass
class SeededVm:
    vm_id: str
    vm_name: str
    context_id: str
    replication_job_id: str
    volume_ids: list[str] = field(default_factory=list)  # root first


async def seed_vm(engine: AsyncEngine, control: EmulatorControl, appliance_vm_id: str, *,
                  vm_name: str = "Windows Server 2022 DC", os_type: str = "windows2019srvNext_64Guest",
                  disks: int = 2, vm_id: str | None = None, test_network_id: str | None = None,
                  live_network_id: str | None = None, replication_status: str = "completed",
                  cpu_count: int = 4, memory_mb: int = 8192, missing_volume_row: bool = False) -> SeededVm:
    """A VM ready for failover: `disks` volumes attached to the appliance, and its rows."""
    vm_id = vm_id or "4205" + uuid.uuid4().hex[4:8] + "-" + str(uuid.uuid4())[9:]
    short = uuid.uuid4().hex[:8]
    volume_ids = []
    for unit in range(disks):
        vol = await control.create_volume(name=f"{vm_name[:40]}-disk{unit}-{short}", size_gb=40 if unit == 0 else 100,
                                          vm_id=appliance_vm_id, content=f"replica:{vm_id}:disk{unit}")
        volume_ids.append(str(vol["id"]))
    now = utcnow()
    context_id = f"ctx-{vm_name[:40]}-{short}"
    job_id = f"job-{uuid.uuid4()}"
    async with engine.begin() as conn:
        await conn.execute(vm_replication_contexts.insert().values(
            context_id=context_id, vm_name=vm_name, vmware_vm_id=vm_id, vm_path=f"/DC1/vm/{vm_name}",
            vcenter_host="vcenter.example.com", datacenter="DC1", current_status="ready_for_failover",
            cpu_count=cpu_count, memory_mb=memory_mb, os_type=os_type, power_state="poweredOn",
            created_at=now, updated_at=now))
        await conn.execute(replication_jobs.insert().values(
            id=job_id, source_vm_id=vm_id, source_vm_name=vm_name, source_vm_path=f"/DC1/vm/{vm_name}",
            vcenter_host="vcenter.example.com", datacenter="DC1", replication_type="incremental",
            status=replication_status, progress_percent=100, vm_context_id=context_id, created_at=now,
            updated_at=now, completed_at=now))
        for unit, volume_id in enumerate(volume_ids):
            ossea_id = None
            if not (missing_volume_row and unit == disks - 1):
                result = await conn.execute(ossea_volumes.insert().values(
                    volume_id=volume_id, volume_name=f"{vm_name[:40]}-disk{unit}", size_gb=40 if unit == 0 else 100,
                    volume_type="DATADISK", status="attached", created_at=now, updated_at=now))
                key = result.inserted_primary_key
                assert key is not None  # typed Optional, but a single-row insert() always has its key
                ossea_id = key[0]
            await conn.execute(vm_disks.insert().values(
                job_id=job_id, vm_context_id=context_id, disk_id=f"disk-{2000 + unit}",
                vmdk_path=f"[datastore1] {vm_name}/{vm_name}_{unit}.vmdk", size_gb=40 if unit == 0 else 100,
                datastore="datastore1", unit_number=unit, label=f"Hard disk {unit + 1}",
                capacity_bytes=(40 if unit == 0 else 100) << 30, provisioning_type="thin",
                ossea_volume_id=ossea_id if ossea_id is not None else 987654321, created_at=now, updated_at=now))
        for network, is_test in ((test_network_id, True), (live_network_id, False)):
            if network:
                await conn.execute(network_mappings.insert().values(
                    vm_id=vm_id, source_network_name="VM Network", destination_network_id=network,
                    destination_network_name="test-net" if is_test else "production", is_test_network=is_test,
                    created_at=now, updated_at=now))
    return SeededVm(vm_id=vm_id, vm_name=vm_name, context_id=context_id, replication_job_id=job_id,
                    volume_ids=volume_ids)
