"""The platform's tables as validation reads them (adapters/db/platform.py), on MariaDB."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.db.engine import make_engine
from adapters.db.platform import PlatformTables
from adapters.db.store import JobStore
from adapters.db.tables import (
    network_mappings,
    ossea_volumes,
    replication_jobs,
    vm_disks,
    vm_replication_contexts,
)
from bench.sqlcount import SqlCounter
from statemachine.ports import DiskVolume, NetworkMapping, ReplicationJob
from tests.crash.support import SQL_WAYS, database_of_its_own, engine_speaking

T0 = datetime(2026, 12, 6, 12, 0, 0)


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with database_of_its_own(database_url, "platform") as made:
        yield made


async def _replication(engine: AsyncEngine, vm_id: str, job_id: str, status: str, at: datetime,
                       disks: list[tuple[str, int, str | None]]) -> list[int]:
    """A replication job of `vm_id` and its disks: (disk id, unit number, volume id or None for
    a disk whose ossea_volumes row is missing); the disks' ossea_volume_id."""
    made_ids = []
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
            made_ids.append(ossea_id)
    return made_ids


async def _a_vm(engine: AsyncEngine) -> tuple[str, str, int]:
    """A VM with two replications (the older completed, the newer still replicating, with a
    disk whose ossea_volumes row is missing) and test and production mappings: its id, the
    newer job's id and its first disk's ossea_volume_id."""
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
    await _replication(engine, vm_id, old, "completed", T0, [("disk-old", 0, f"vol-{old}")])
    first, _ = await _replication(engine, vm_id, new, "replicating", T0 + timedelta(minutes=5),
                                  [("disk-a", 0, f"vol-{new}"), ("disk-b", 1, None)])
    return vm_id, new, first


@pytest.mark.parametrize("way", SQL_WAYS)
async def test_the_newest_replication_its_disks_and_the_mappings_asked_for(engine: AsyncEngine, way: str) -> None:
    vm_id, new, ossea_id = await _a_vm(engine)
    async with engine_speaking(way, engine.url.render_as_string(hide_password=False)) as speaking:
        platform = PlatformTables(speaking)
        test = await platform.source(vm_id, test=True)
        live = await platform.source(vm_id, test=False)
    assert test.vm is not None and (test.vm.vm_name, test.vm.cpu_count, test.vm.os_type) == (
        "web 01", 2, "otherLinux64Guest")
    assert test.replication == ReplicationJob(id=new, status="replicating")  # the newest, whatever its status
    assert test.disks == [DiskVolume("disk-a", 0, 10, ossea_id, f"vol-{new}"),
                          DiskVolume("disk-b", 1, 10, 999_999_999, None)]  # by unit; a missing row: no volume
    assert test.mappings == [NetworkMapping("VM Network", "net-test", "NET-TEST"),
                             NetworkMapping("VM Network", "net-test-2", "NET-TEST-2")]
    assert live.mappings == [NetworkMapping("VM Network", "net-live", "NET-LIVE")] and live.disks == test.disks


async def test_validation_and_the_ledger_read_in_one_request_each(engine: AsyncEngine) -> None:
    """What a job reads before its steps: one round trip each (the reads and their COMMIT)."""
    vm_id, _, _ = await _a_vm(engine)
    url = make_url(engine.url.render_as_string(hide_password=False))
    counter = SqlCounter(url.host or "127.0.0.1", url.port or 3306)
    proxied = make_engine(url.set(host="127.0.0.1", port=await counter.start()).render_as_string(
        hide_password=False), pool_size=1)
    try:
        platform, store = PlatformTables(proxied), JobStore(proxied, owner="platform-test")
        await platform.source(vm_id, test=True)  # the connection opened (its own requests) and warm
        before = counter.snapshot()
        source = await platform.source(vm_id, test=True)
        assert await store.ledger(f"job-{uuid.uuid4()}") == []
        after = counter.snapshot()
    finally:
        await proxied.dispose()
        await counter.close()
    assert source.vm is not None and len(source.disks) == 2
    assert after["requests"] - before["requests"] == 2
    assert after["kinds"].get("COMMIT", 0) - before["kinds"].get("COMMIT", 0) == 2  # no other COMMIT on the way out
    assert after["kinds"].get("ROLLBACK", 0) == before["kinds"].get("ROLLBACK", 0)


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
