"""The platform's tables as validation reads them (adapters/db/platform.py), on MariaDB."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.platform import PlatformTables
from adapters.db.tables import (
    network_mappings,
    ossea_volumes,
    replication_jobs,
    vm_disks,
    vm_replication_contexts,
)
from statemachine.ports import DiskVolume, NetworkMapping, ReplicationJob
from tests.crash.support import database_of_its_own

T0 = datetime(2026, 12, 6, 12, 0, 0)


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "platform") as made:
        yield made


async def _replication(engine: AsyncEngine, vm_id: str, job_id: str, status: str, at: datetime,
                       disks: list[tuple[str, int, str | None]]) -> None:
    """A replication job of `vm_id` and its disks: (disk id, unit number, volume id or None for
    a disk whose ossea_volumes row is missing)."""
    async with engine.begin() as conn:
        await conn.execute(replication_jobs.insert().values(
            id=job_id, source_vm_id=vm_id, source_vm_name="web", status=status, created_at=at, updated_at=at))
        for disk_id, unit, volume_id in disks:
            ossea_id = 999_999_999
            if volume_id is not None:
                made = await conn.execute(ossea_volumes.insert().values(
                    volume_id=volume_id, volume_name=disk_id, size_gb=10, volume_type="DATADISK", status="attached",
                    created_at=at, updated_at=at))
                ossea_id = made.inserted_primary_key[0]  # type: ignore[index]
            await conn.execute(vm_disks.insert().values(
                job_id=job_id, disk_id=disk_id, unit_number=unit, size_gb=10, ossea_volume_id=ossea_id,
                created_at=at, updated_at=at))


async def test_the_newest_replication_its_disks_and_the_mappings_asked_for(engine: AsyncEngine) -> None:
    vm_id = f"vm-{uuid.uuid4()}"
    async with engine.begin() as conn:
        await conn.execute(vm_replication_contexts.insert().values(
            context_id=f"ctx-{vm_id}", vm_name="web 01", vmware_vm_id=vm_id, current_status="ready_for_failover",
            cpu_count=2, memory_mb=4096, os_type="otherLinux64Guest", created_at=T0, updated_at=T0))
        for net, is_test in (("net-test", True), ("net-live", False), ("net-test-2", True)):
            await conn.execute(network_mappings.insert().values(
                vm_id=vm_id, source_network_name="VM Network", destination_network_id=net,
                destination_network_name=net.upper(), is_test_network=is_test, created_at=T0, updated_at=T0))
    old, new = f"job-{uuid.uuid4()}", f"job-{uuid.uuid4()}"
    await _replication(engine, vm_id, old, "completed", T0, [("disk-old", 0, "vol-old")])
    await _replication(engine, vm_id, new, "replicating", T0 + timedelta(minutes=5),
                       [("disk-b", 1, None), ("disk-a", 0, f"vol-{new}")])
    platform = PlatformTables(engine)

    test = await platform.source(vm_id, test=True)
    assert test.vm is not None and (test.vm.vm_name, test.vm.cpu_count, test.vm.os_type) == (
        "web 01", 2, "otherLinux64Guest")
    assert test.replication == ReplicationJob(id=new, status="replicating")  # the newest, whatever its status
    assert test.disks == [DiskVolume("disk-a", 0, 10, test.disks[0].ossea_volume_id, f"vol-{new}"),
                          DiskVolume("disk-b", 1, 10, 999_999_999, None)]  # by unit; a missing row: no volume
    assert test.mappings == [NetworkMapping("VM Network", "net-test", "NET-TEST"),
                             NetworkMapping("VM Network", "net-test-2", "NET-TEST-2")]
    live = await platform.source(vm_id, test=False)
    assert live.mappings == [NetworkMapping("VM Network", "net-live", "NET-LIVE")] and live.disks == test.disks


async def test_a_vm_the_platform_does_not_know(engine: AsyncEngine) -> None:
    source = await PlatformTables(engine).source(f"vm-{uuid.uuid4()}", test=True)
    assert (source.vm, source.replication, source.disks, source.mappings) == (None, None, [], [])


async def test_a_vm_without_a_replication_has_no_disks(engine: AsyncEngine) -> None:
    vm_id = f"vm-{uuid.uuid4()}"
    async with engine.begin() as conn:
        await conn.execute(vm_replication_contexts.insert().values(
            context_id=f"ctx-{vm_id}", vm_name="db", vmware_vm_id=vm_id, current_status="discovered",
            created_at=T0, updated_at=T0))
    source = await PlatformTables(engine).source(vm_id, test=False)
    assert source.vm is not None and source.replication is None and source.disks == []
