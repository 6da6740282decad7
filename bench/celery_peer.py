"""The peer a Python team would otherwise pick: the same test failover as a Celery chain of six
tasks, on the same RabbitMQ and MariaDB, against the same emulators.

Run as a worker: ``celery -A bench.celery_peer worker -P <pool> -c <n>`` with BENCH_CELERY_*
set (bench/celery_phases.py does it). Fairness, as chosen for this benchmark:

- every task makes the SAME emulator HTTP calls, in the same order, as the corresponding step
  of the service (38 per two-disk Linux VM at zero latency, counted from the emulator's call
  log), with real semantics (snapshots, deploy, detach/attach through the Volume Daemon, start),
  polling async jobs and operations every BENCH_CELERY_POLL seconds like the service does
  (FAILOVER_POLL_INTERVAL_SECONDS), signed by the same `cs` library;
- the first task reads the same four platform tables the service's validation reads;
- every task writes its audit row to MariaDB (table `celery_audit`) in its own transaction;
- reliability settings a failover needs: acks late, reject on worker lost, publisher confirms,
  persistent messages, quorum queues (as the service's queues are).

What the Celery version does NOT do, that the service does: no resource ledger (a crash
mid-chain cannot be resumed without repeating work), no events on the bus, no read models,
no rollback, no cancel, no leases. It is the lower bound of work a reliable chain does.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from contextlib import contextmanager
from typing import Any

from celery import Celery

BROKER = os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672/failover-bench")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench.celery")
QUEUE_TYPE = os.environ.get("BENCH_CELERY_QUEUE_TYPE", "quorum")

app = Celery("bench_celery_peer", broker=BROKER)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    broker_transport_options={"confirm_publish": True},
    task_default_delivery_mode="persistent",
    task_default_queue=QUEUE,
    task_default_queue_type=QUEUE_TYPE,
    worker_detect_quorum_queues=True,
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "4")),
    broker_pool_limit=int(os.environ.get("BENCH_CELERY_BROKER_POOL", "10")),
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
)

# --------------------------------------------------------------------------- per-process clients
# Created lazily in the worker process (after the fork of prefork, after gevent's patching).

_lock = threading.Lock()
_db_pool: queue.LifoQueue[Any] | None = None
_local = threading.local()


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set")
    return value


def _pool() -> queue.LifoQueue[Any]:
    global _db_pool
    with _lock:
        if _db_pool is None:
            import pymysql

            size = int(os.environ.get("BENCH_CELERY_DB_POOL", "20"))
            pool: queue.LifoQueue[Any] = queue.LifoQueue()
            for _ in range(size):
                pool.put(pymysql.connect(
                    host=os.environ.get("BENCH_CELERY_DB_HOST", "127.0.0.1"),
                    port=int(os.environ.get("BENCH_CELERY_DB_PORT", "3306")),
                    user=os.environ.get("BENCH_CELERY_DB_USER", "root"),
                    password=os.environ.get("BENCH_CELERY_DB_PASSWORD", ""),
                    database=os.environ.get("BENCH_CELERY_DB_NAME", "failover_bench"),
                    autocommit=False, charset="utf8mb4"))
            _db_pool = pool
        return _db_pool


@contextmanager
def _db() -> Any:
    pool = _pool()
    conn = pool.get()
    try:
        yield conn
    finally:
        pool.put(conn)


def _http() -> tuple[Any, Any]:
    """(CloudStack client, requests session for the Volume Daemon) of this thread/greenlet."""
    clients = getattr(_local, "clients", None)
    if clients is None:
        import requests
        from cs import CloudStack

        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4)
        session.mount("http://", adapter)
        cs = CloudStack(endpoint=_env("BENCH_CELERY_CS_URL"), key=_env("BENCH_CELERY_CS_KEY"),
                        secret=_env("BENCH_CELERY_CS_SECRET"), fetch_result=False, session=session,
                        timeout=60)
        clients = (cs, session)
        _local.clients = clients
    return clients


def _poll() -> float:
    return float(os.environ.get("BENCH_CELERY_POLL", "0.5"))


def _audit(job_id: str, step: str, status: str = "completed", detail: str = "") -> None:
    """The task's audit row, in its own transaction."""
    with _db() as conn:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO celery_audit (run_id, job_id, step, status, detail, at) "
                        "VALUES (%s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
                        (os.environ.get("BENCH_CELERY_RUN", "run"), job_id, step, status, detail[:250]))
        conn.commit()


# --------------------------------------------------------------------------- the calls


def _cs(command: str, **params: Any) -> dict[str, Any]:
    cs, _ = _http()
    result: dict[str, Any] = getattr(cs, command)(**params)
    return result


def _wait_job(job_id: str) -> dict[str, Any]:
    while True:
        data = _cs("queryAsyncJobResult", jobid=job_id)
        status = data.get("jobstatus")
        if status == 1:
            return data.get("jobresult") or {}
        if status == 2:
            raise RuntimeError(f"async job {job_id} failed: {data.get('jobresult')}")
        time.sleep(_poll())


def _vd(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    _, session = _http()
    resp = session.request(method, _env("BENCH_CELERY_VD_URL").rstrip("/") + "/api/v1" + path, json=body, timeout=60)
    if resp.status_code >= 400:
        raise RuntimeError(f"Volume Daemon {method} {path}: {resp.status_code} {resp.text[:200]}")
    data: dict[str, Any] = resp.json()
    return data


def _wait_op(op_id: str) -> dict[str, Any]:
    while True:
        d = _vd("GET", f"/operations/{op_id}")
        if d.get("status") == "completed":
            return d
        if d.get("status") == "failed":
            raise RuntimeError(f"operation {op_id} failed: {d.get('error')}")
        time.sleep(_poll())


def _detach(volume_id: str) -> None:
    cur = _vd("GET", f"/volumes/{volume_id}")
    if cur.get("vm_id"):
        op = _vd("POST", f"/volumes/{volume_id}/detach", {})
        _wait_op(op["id"])


def _attach(volume_id: str, vm_id: str, root: bool) -> int | None:
    _vd("GET", f"/volumes/{volume_id}")
    op = _vd("POST", f"/volumes/{volume_id}/{'attach-root' if root else 'attach'}", {"vm_id": vm_id})
    _wait_op(op["id"])
    device: int | None = _vd("GET", f"/volumes/{volume_id}").get("device_id")
    return device


# --------------------------------------------------------------------------- the six tasks


@app.task(name="bench.warm")
def warm() -> None:
    """Open the process's database pool and this thread's HTTP clients before the timing."""
    _http()
    _cs("listZones", name=os.environ["BENCH_CELERY_ZONE"])
    _audit("warm", "warm")


@app.task(name="bench.validate")
def validate(job: dict[str, Any]) -> dict[str, Any]:
    """pre-failover-validation: the four platform reads, one get-volume per disk."""
    vm_id = job["vm_id"]
    with _db() as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT vm_name, os_type, cpu_count, memory_mb FROM vm_replication_contexts "
                        "WHERE vmware_vm_id = %s", (vm_id,))
            name, os_type, cpu, mem = cur.fetchone()
            cur.execute("SELECT id, status FROM replication_jobs WHERE source_vm_id = %s "
                        "ORDER BY created_at DESC, id DESC LIMIT 1", (vm_id,))
            rjob, status = cur.fetchone()
            cur.execute("SELECT d.disk_id, d.unit_number, v.volume_id FROM vm_disks d LEFT JOIN ossea_volumes v "
                        "ON v.id = d.ossea_volume_id WHERE d.job_id = %s ORDER BY d.unit_number, d.id", (rjob,))
            disks = cur.fetchall()
            cur.execute("SELECT destination_network_id FROM network_mappings WHERE vm_id = %s "
                        "AND is_test_network = 1 ORDER BY id", (vm_id,))
            networks = [r[0] for r in cur.fetchall()]
        conn.rollback()
    if status != "completed":
        raise RuntimeError(f"replication job {rjob} is {status}")
    volumes = []
    for i, (_, _, volume_id) in enumerate(disks):
        state = _vd("GET", f"/volumes/{volume_id}")
        if state.get("vm_id") != os.environ["BENCH_CELERY_APPLIANCE"]:
            raise RuntimeError(f"volume {volume_id} is not on the appliance")
        volumes.append({"volume_id": volume_id, "root": i == 0})
    job.update(vm_name=name, os_type=os_type, cpu=cpu or 1, memory=mem or 1024, volumes=volumes,
               networks=networks or [os.environ["BENCH_CELERY_NETWORK"]],
               cs_name=f"{name}-c-{job['job_id'][:8]}".lower())
    _audit(job["job_id"], "pre-failover-validation")
    return job


@app.task(name="bench.snapshot")
def snapshot(job: dict[str, Any]) -> dict[str, Any]:
    """cloudstack-snapshot: per volume, look up by name, create, wait, read it back."""
    snaps = []
    for vol in job["volumes"]:
        name = f"celery-{job['job_id'][:8]}-{vol['volume_id'][:8]}"
        _cs("listSnapshots", volumeid=vol["volume_id"], name=name)
        start = _cs("createSnapshot", volumeid=vol["volume_id"], name=name)
        _wait_job(start["jobid"])
        snap = _cs("listSnapshots", id=start["id"])["snapshot"][0]
        if snap["state"] != "BackedUp":
            raise RuntimeError(f"snapshot {snap['id']} is {snap['state']}")
        snaps.append(snap["id"])
    job["snapshots"] = snaps
    _audit(job["job_id"], "cloudstack-snapshot")
    return job


@app.task(name="bench.inject")
def inject(job: dict[str, Any]) -> dict[str, Any]:
    """virtio-driver-injection: skipped for a Linux VM (as the service skips it)."""
    _audit(job["job_id"], "virtio-driver-injection", "skipped")
    return job


@app.task(name="bench.create_vm")
def create_vm(job: dict[str, Any]) -> dict[str, Any]:
    """vm-creation: zone lookup, name lookup, deploy stopped, wait, read it back."""
    zone = _cs("listZones", name=os.environ["BENCH_CELERY_ZONE"])["zone"][0]["id"]
    _cs("listVirtualMachines", name=job["cs_name"])
    start = _cs("deployVirtualMachine", serviceofferingid=os.environ["BENCH_CELERY_OFFERING"],
                templateid=os.environ["BENCH_CELERY_TEMPLATE"], zoneid=zone, name=job["cs_name"],
                displayname=job["vm_name"], networkids=job["networks"], startvm=False,
                details={"cpuNumber": job["cpu"], "memory": job["memory"]})
    _wait_job(start["jobid"])
    _cs("listVirtualMachines", id=start["id"])
    job["vm"] = start["id"]
    _audit(job["job_id"], "vm-creation")
    return job


@app.task(name="bench.attach")
def attach(job: dict[str, Any]) -> dict[str, Any]:
    """volume-attachment: drop the deploy's root disk, move the replicated volumes, root first."""
    vm = job["vm"]
    replicated = {v["volume_id"] for v in job["volumes"]}
    listed = _cs("listVolumes", virtualmachineid=vm).get("volume", [])
    for v in listed:
        if v["id"] not in replicated:
            _detach(v["id"])
            _cs("deleteVolume", id=v["id"])
    for vol in job["volumes"]:
        _detach(vol["volume_id"])
    for vol in job["volumes"]:
        _attach(vol["volume_id"], vm, vol["root"])
    _audit(job["job_id"], "volume-attachment")
    return job


@app.task(name="bench.start_vm")
def start_vm(job: dict[str, Any]) -> dict[str, Any]:
    """vm-startup-validation: start, wait, check Running."""
    vm = job["vm"]
    _cs("listVirtualMachines", id=vm)
    start = _cs("startVirtualMachine", id=vm)
    _wait_job(start["jobid"])
    state = _cs("listVirtualMachines", id=vm)["virtualmachine"][0]["state"]
    if state != "Running":
        raise RuntimeError(f"VM {vm} is {state}")
    _audit(job["job_id"], "vm-startup-validation")
    return job


CHAIN = (validate, snapshot, inject, create_vm, attach, start_vm)


def failover_chain(job_id: str, vm_id: str) -> Any:
    from celery import chain

    return chain(validate.s({"job_id": job_id, "vm_id": vm_id}), *(t.s() for t in CHAIN[1:]))
