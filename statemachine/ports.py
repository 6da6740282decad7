"""The ports: what the engine needs from the outside world, as small Protocols.

The engine and the steps import only these; the adapters package implements them for
CloudStack (the `cs` client), the Volume Daemon (HTTP), the injection script (a subprocess)
and MariaDB (SQLAlchemy); the tests' fakes implement them in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.events import Event

# --------------------------------------------------------------------------- CloudStack

@dataclass(frozen=True)
class AsyncStart:
    """What an async CloudStack command answers at once: the resource id (if any) and job id."""

    resource_id: str | None
    job_id: str


@dataclass(frozen=True)
class CsSnapshot:
    id: str
    name: str
    volume_id: str
    state: str
    revertable: bool


@dataclass(frozen=True)
class CsVm:
    id: str
    name: str
    state: str
    display_name: str = ""  # ("": CloudStack did not say)


@dataclass(frozen=True)
class CsVolume:
    id: str
    name: str
    type: str  # ROOT | DATADISK
    vm_id: str | None
    device_id: int | None


@dataclass(frozen=True)
class DeploySpec:
    name: str
    display_name: str
    zone_id: str
    template_id: str
    service_offering_id: str
    disk_offering_id: str | None
    network_ids: Sequence[str]
    cpu_count: int
    memory_mb: int


class CloudStackPort(Protocol):
    """CloudStack's API, by the commands the steps need. Async commands return `AsyncStart`
    at once; the caller records the job id, then waits with `wait_job`."""

    async def resolve_zone(self, zone: str) -> str: ...
    async def wait_job(self, job_id: str, timeout: float) -> dict[str, Any]: ...
    def snapshot_in(self, job_result: dict[str, Any]) -> CsSnapshot | None:
        """The snapshot a finished createSnapshot job returned, if its result holds it whole
        (id, state, revertable); None: look it up."""
        ...
    def vm_in(self, job_result: dict[str, Any]) -> CsVm | None:
        """The VM a finished deployVirtualMachine job returned, if its result holds it."""
        ...
    async def create_snapshot(self, volume_id: str, name: str) -> AsyncStart: ...
    async def find_snapshot(self, name: str, volume_id: str) -> CsSnapshot | None: ...
    async def find_snapshots(self, name: str, volume_id: str) -> list[CsSnapshot]:
        """Every snapshot of the volume with exactly this name, failed ones included."""
        ...
    async def get_snapshot(self, snapshot_id: str) -> CsSnapshot | None: ...
    async def revert_snapshot(self, snapshot_id: str) -> AsyncStart: ...
    async def volume_state(self, volume_id: str) -> str | None:
        """The volume's state as CloudStack has it (Ready, RevertSnapshotting ...); None: removed."""
        ...
    async def delete_snapshot(self, snapshot_id: str) -> AsyncStart: ...
    async def deploy_vm(self, spec: DeploySpec) -> AsyncStart: ...
    async def find_vm(self, name: str) -> CsVm | None: ...
    async def find_vms(self, name: str) -> list[CsVm]:
        """Every VM with exactly this name that is not destroyed, failed ones included."""
        ...
    async def get_vm(self, vm_id: str) -> CsVm | None: ...
    async def start_vm(self, vm_id: str) -> AsyncStart: ...
    async def stop_vm(self, vm_id: str) -> AsyncStart: ...
    async def destroy_vm(self, vm_id: str) -> AsyncStart: ...
    async def list_vm_volumes(self, vm_id: str) -> list[CsVolume]: ...
    async def delete_volume(self, volume_id: str) -> None:
        """Delete a detached volume; one that is already gone is not an error."""
        ...


# --------------------------------------------------------------------------- Volume Daemon

@dataclass(frozen=True)
class DaemonVolume:
    volume_id: str
    vm_id: str | None
    device_id: int | None
    device_path: str | None
    type: str


@dataclass(frozen=True)
class DaemonOperation:
    id: str
    status: str  # pending | executing | completed | failed
    error: str | None
    device_id: int | None = None
    device_path: str | None = None


class VolumeDaemonPort(Protocol):
    """MigrateKit's Volume Daemon: every attach and detach goes through it."""

    async def get_volume(self, volume_id: str) -> DaemonVolume: ...
    async def attach(self, volume_id: str, vm_id: str) -> str: ...
    async def attach_root(self, volume_id: str, vm_id: str) -> str: ...
    async def detach(self, volume_id: str) -> str: ...
    async def wait_operation(self, operation_id: str, timeout: float) -> DaemonOperation: ...


# --------------------------------------------------------------------------- injection

class InjectionPort(Protocol):
    """The driver-injection script, run on the root volume's device path."""

    async def inject(
        self, device_path: str, job_id: str, on_line: Callable[[str], Awaitable[None]]
    ) -> None: ...

    async def wait_idle(self, device_path: str, on_line: Callable[[str], Awaitable[None]]) -> None:
        """Until no run of the script holds the device (one that outlived a killed process),
        saying so through `on_line` if it has to wait: raises a StepError if one still does
        after the injection's timeout."""


# --------------------------------------------------------------------------- platform tables

@dataclass(frozen=True)
class VmContext:
    vm_id: str
    context_id: str
    vm_name: str
    current_status: str
    cpu_count: int | None
    memory_mb: int | None
    os_type: str | None
    power_state: str | None = None  # VMware's: poweredOn | poweredOff | suspended


@dataclass(frozen=True)
class ReplicationJob:
    id: str
    status: str


@dataclass(frozen=True)
class DiskVolume:
    disk_id: str
    unit_number: int | None
    size_gb: int | None
    ossea_volume_id: int | None
    volume_id: str | None  # the CloudStack volume UUID, None when the row is missing


@dataclass(frozen=True)
class NetworkMapping:
    source_network_name: str
    destination_network_id: str
    destination_network_name: str | None


@dataclass(frozen=True)
class PlatformSource:
    """What the platform's tables say of a VM to fail over, read at one moment."""

    vm: VmContext | None  # None: not in vm_replication_contexts
    replication: ReplicationJob | None  # its newest replication job
    disks: list[DiskVolume]  # that job's disks (none without one)
    mappings: list[NetworkMapping]  # its test or production network mappings, as asked


class PlatformPort(Protocol):
    """The migration platform's tables (read-only, except the VM's current status)."""

    async def source(self, vm_id: str, test: bool) -> PlatformSource: ...


# --------------------------------------------------------------------------- the job store

@dataclass
class LedgerEntry:
    """One external resource a job created or moved, written before the call that does it."""

    key: str
    resource_type: str
    action: str
    status: str = "intended"  # intended | done | undone | failed
    resource_id: str | None = None
    name: str | None = None
    cs_job_id: str | None = None
    operation_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobRow:
    """The engine's view of a `failover_jobs` row."""

    job_id: str
    request_id: str
    job_type: str  # test-failover | live-failover | cleanup
    vm_id: str
    vm_name: str
    correlation_id: str
    parent_job_id: str | None
    requested_by: str
    status: str
    last_sequence: int
    resume_state: str | None
    options: dict[str, Any]
    plan: dict[str, Any]
    cancel_requested: bool
    rollback_requested: bool
    failed_step: str | None
    error_code: str | None
    error_message: str | None
    created_at: float  # epoch seconds
    started_at: float | None
    # the outcome of the job's latest rollback once its RollbackCompleted (True) or
    # RollbackFailed (False) is committed; None before, and again from a RollbackStarted on
    rolled_back: bool | None = None


@dataclass
class Commit:
    """What one transaction of a job writes: its new state, its events, its ledger changes,
    and the platform side effects that must happen atomically with them."""

    events: list[Event] = field(default_factory=list)
    job: dict[str, Any] = field(default_factory=dict)  # failover_jobs columns to set
    ledger: list[LedgerEntry] = field(default_factory=list)
    vm_status: str | None = None  # vm_replication_contexts.current_status of the job's VM
    parent: dict[str, Any] = field(default_factory=dict)  # columns to set on the parent job
    # written in the same transaction only while no cancel is asked for (its events follow
    # these): a step's start rides the previous step's end, unless the job is to stop there
    tail: Commit | None = None

    def with_tail(self) -> Commit:
        """This commit and its tail as one."""
        if self.tail is None:
            return self
        t = self.tail
        return Commit(events=[*self.events, *t.events], job={**self.job, **t.job}, ledger=[*self.ledger, *t.ledger],
                      vm_status=t.vm_status or self.vm_status, parent={**self.parent, **t.parent})


@dataclass(frozen=True)
class NameHolder:
    """Another job's claim on a VM name (`JobStorePort.claim_vm_name`): its id and state."""

    job_id: str
    status: str | None  # None: the row is gone (the claim is then taken over)
    ended: bool


class JobStorePort(Protocol):
    """Transactions of one job, fenced by its lease: a commit from a process that no longer
    owns the job raises `LeaseLost` and writes nothing."""

    async def commit(self, job: JobRow, commit: Commit) -> bool:
        """Write it all in one transaction; return whether a cancel has been requested (and
        then the commit's `tail`, if any, was not written)."""
        ...

    async def ledger(self, job_id: str) -> list[LedgerEntry]: ...
    async def cleanup_ledgers(self, parent_job_id: str, vm_id: str) -> list[LedgerEntry]:
        """The ledger entries of every cleanup job of `parent_job_id` (a failover of `vm_id`),
        oldest first."""
        ...
    async def claim_vm_name(self, job_id: str, name: str) -> NameHolder | None:
        """Claim `name` for the VM `job_id` deploys: None once the job holds it (again, if it
        did already), else the job that does. A claim is held until its job ended with nothing
        of its own left under the name (completed, or rolled back); then the next job to ask
        takes it over."""
        ...
    async def vm_name_holder(self, name: str) -> str | None:
        """The job whose claim on `name` stands (released or not), if any: a read, no claim."""
        ...
    async def load(self, job_id: str) -> JobRow | None: ...
