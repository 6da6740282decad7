"""`statemachine.ports.PlatformPort` on the migration platform's tables (read-only)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from statemachine.ports import DiskVolume, NetworkMapping, ReplicationJob, VmContext

from .tables import (
    network_mappings,
    ossea_volumes,
    replication_jobs,
    vm_disks,
    vm_replication_contexts,
)


class PlatformTables:
    """The seed's data path: replication_jobs -> vm_disks -> ossea_volumes, and the mappings."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def vm_context(self, vm_id: str) -> VmContext | None:
        t = vm_replication_contexts
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(t).where(t.c.vmware_vm_id == vm_id))).first()
        if r is None:
            return None
        return VmContext(vm_id=r.vmware_vm_id, context_id=r.context_id, vm_name=r.vm_name,
                         current_status=r.current_status, cpu_count=r.cpu_count, memory_mb=r.memory_mb,
                         os_type=r.os_type)

    async def newest_replication_job(self, vm_id: str) -> ReplicationJob | None:
        t = replication_jobs
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(t.c.id, t.c.status).where(t.c.source_vm_id == vm_id)
                                    .order_by(t.c.created_at.desc(), t.c.id.desc()).limit(1))).first()
        return ReplicationJob(id=r.id, status=r.status) if r else None

    async def disks(self, replication_job_id: str) -> list[DiskVolume]:
        d, v = vm_disks, ossea_volumes
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(d.c.disk_id, d.c.unit_number, d.c.size_gb, d.c.ossea_volume_id, v.c.volume_id)
                .select_from(d.outerjoin(v, v.c.id == d.c.ossea_volume_id))
                .where(d.c.job_id == replication_job_id).order_by(d.c.unit_number, d.c.id))).all()
        return [DiskVolume(disk_id=r.disk_id, unit_number=r.unit_number, size_gb=r.size_gb,
                           ossea_volume_id=r.ossea_volume_id, volume_id=r.volume_id) for r in rows]

    async def network_mappings(self, vm_id: str, test: bool) -> list[NetworkMapping]:
        t = network_mappings
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(t).where(t.c.vm_id == vm_id, t.c.is_test_network.is_(test))
                                       .order_by(t.c.id))).all()
        return [NetworkMapping(source_network_name=r.source_network_name,
                               destination_network_id=r.destination_network_id,
                               destination_network_name=r.destination_network_name) for r in rows]
