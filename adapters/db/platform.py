"""`statemachine.ports.PlatformPort` on the migration platform's tables (read-only)."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncEngine

from statemachine.ports import DiskVolume, NetworkMapping, PlatformSource, ReplicationJob, VmContext

from . import raw
from .tables import (
    network_mappings,
    ossea_volumes,
    replication_jobs,
    vm_disks,
    vm_replication_contexts,
)

# built once, run on the driver (adapters/db/raw.py): validation reads these for every job
_VM_CONTEXT = select(vm_replication_contexts).where(vm_replication_contexts.c.vmware_vm_id == bindparam("vm_id"))
_NEWEST_REPLICATION = (select(replication_jobs.c.id, replication_jobs.c.status)
                       .where(replication_jobs.c.source_vm_id == bindparam("vm_id"))
                       .order_by(replication_jobs.c.created_at.desc(), replication_jobs.c.id.desc()).limit(1))
# the disks of the VM's newest replication job (`_NEWEST_REPLICATION`'s), in the same request
_DISKS = (select(vm_disks.c.disk_id, vm_disks.c.unit_number, vm_disks.c.size_gb, vm_disks.c.ossea_volume_id,
                 ossea_volumes.c.volume_id, vm_disks.c.job_id)
          .select_from(vm_disks.outerjoin(ossea_volumes, ossea_volumes.c.id == vm_disks.c.ossea_volume_id))
          .where(vm_disks.c.job_id == _NEWEST_REPLICATION.with_only_columns(replication_jobs.c.id).scalar_subquery())
          .order_by(vm_disks.c.unit_number, vm_disks.c.id))
_MAPPINGS = {test: select(network_mappings).where(network_mappings.c.vm_id == bindparam("vm_id"),
                                                  network_mappings.c.is_test_network.is_(test))
             .order_by(network_mappings.c.id) for test in (True, False)}


class PlatformTables:
    """The seed's data path: replication_jobs -> vm_disks -> ossea_volumes, and the mappings."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def source(self, vm_id: str, test: bool) -> PlatformSource:
        """The four reads in one request, with the COMMIT that ends them (one round trip instead
        of eight: each read had been its own transaction)."""
        params = {"vm_id": vm_id}
        for _ in range(3):
            async with raw.transaction(self.engine) as tx:
                contexts, jobs, disks, mappings = await tx.fetch_all(
                    [(_VM_CONTEXT, params), (_NEWEST_REPLICATION, params), (_DISKS, params),
                     (_MAPPINGS[bool(test)], params)], commit=True)
            # one view under REPEATABLE READ (the server's default); under READ COMMITTED a
            # replication committed between two statements could give the disks of a newer
            # job than the one read: then read again (after three tries, the read job's only)
            newest = jobs[0].id if jobs else None
            if all(r.job_id == newest for r in disks):
                break
        disks = [r for r in disks if r.job_id == newest]
        vm = None
        if contexts:
            r = contexts[0]
            vm = VmContext(vm_id=r.vmware_vm_id, context_id=r.context_id, vm_name=r.vm_name,
                           current_status=r.current_status, cpu_count=r.cpu_count, memory_mb=r.memory_mb,
                           os_type=r.os_type, power_state=r.power_state)
        return PlatformSource(
            vm=vm,
            replication=ReplicationJob(id=jobs[0].id, status=jobs[0].status) if jobs else None,
            disks=[DiskVolume(disk_id=r.disk_id, unit_number=r.unit_number, size_gb=r.size_gb,
                              ossea_volume_id=r.ossea_volume_id, volume_id=r.volume_id) for r in disks],
            mappings=[NetworkMapping(source_network_name=r.source_network_name,
                                     destination_network_id=r.destination_network_id,
                                     destination_network_name=r.destination_network_name) for r in mappings])
