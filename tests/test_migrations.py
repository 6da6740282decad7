"""The Alembic migrations: they create exactly the tables the code uses, `failoverctl db
upgrade` works from any directory, and the platform's own tables are never touched."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from adapters.db.tables import metadata

from .helpers import ROOT


async def test_the_migrations_create_exactly_the_tables_of_the_code(db: Any) -> None:
    def diff(sync_conn: Any) -> list[Any]:
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with db.connect() as conn:
        differences = await conn.run_sync(diff)
    # the only table Alembic itself adds is its version table
    assert differences == []


def _server_url(database_url: str, name: str) -> str:
    return make_url(database_url).set(database=name).render_as_string(hide_password=False)


async def _tables(url: str) -> dict[str, list[str]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: {
                t: [col["name"] for col in inspect(c).get_columns(t)] for t in inspect(c).get_table_names()})
    finally:
        await engine.dispose()


async def _empty_database(database_url: str) -> tuple[str, str]:
    """A new empty database on the server: its name and URL."""
    name = f"failover_mig_{uuid.uuid4().hex[:8]}"
    server = create_async_engine(make_url(database_url).set(database=""))
    async with server.begin() as conn:
        await conn.execute(text(f"CREATE DATABASE `{name}`"))
    await server.dispose()
    return name, _server_url(database_url, name)


async def _drop(database_url: str, name: str) -> None:
    engine = create_async_engine(make_url(database_url).set(database=""))
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    await engine.dispose()


async def test_db_upgrade_from_any_directory_creates_the_database(database_url: str, tmp_path: Any) -> None:
    name = f"failover_mig_{uuid.uuid4().hex[:8]}"
    url = _server_url(database_url, name)
    try:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "failover.cli", "db", "upgrade"],
            cwd=tmp_path, env={"FAILOVER_DATABASE_URL": url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        tables = await _tables(url)
        assert {"failover_jobs", "job_tracking", "job_steps", "log_events", "outbox", "resource_ledger",
                "job_commands", "vm_replication_contexts", "replication_jobs", "vm_disks", "ossea_volumes",
                "network_mappings", "alembic_version"} <= set(tables)
        # running it again is a no-op
        again = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "failover.cli", "db", "upgrade"],
            cwd=tmp_path, env={"FAILOVER_DATABASE_URL": url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
    finally:
        await _drop(database_url, name)


async def test_existing_platform_tables_are_left_alone(database_url: str) -> None:
    name, url = await _empty_database(database_url)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:  # MigrateKit's own, richer table, with a row
            await conn.execute(text(
                "CREATE TABLE vm_replication_contexts (context_id VARCHAR(64) PRIMARY KEY, vm_name VARCHAR(191),"
                " vmware_vm_id VARCHAR(191) UNIQUE, current_status VARCHAR(50), cpu_count INT, memory_mb INT,"
                " os_type VARCHAR(255), power_state VARCHAR(50), scheduler_group VARCHAR(64))"))
            await conn.execute(text("INSERT INTO vm_replication_contexts VALUES "
                                    "('ctx-1', 'keep me', 'vm-1', 'ready_for_failover', 2, 2048, 'linux', 'on', 'g1')"))
        from adapters.db.migrate import upgrade

        await asyncio.to_thread(upgrade, url)
        tables = await _tables(url)
        assert "scheduler_group" in tables["vm_replication_contexts"]
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT vm_name FROM vm_replication_contexts"))).scalar_one() == "keep me"
        assert "failover_jobs" in tables
    finally:
        await engine.dispose()
        await _drop(database_url, name)


async def test_the_name_claims_go_to_the_jobs_that_recorded_a_vm_before_them(database_url: str) -> None:
    """0002: a job that recorded a VM under a name before the claims existed, and may still
    look it up by that name (running, or ended without its rollback), holds the name after the
    upgrade (the oldest such job where two did); a job that completed or rolled back does not."""
    from adapters.db.migrate import upgrade

    name, url = await _empty_database(database_url)
    engine = create_async_engine(url)
    try:
        await asyncio.to_thread(upgrade, url, "0001")
        jobs = {  # job -> (VM name, ended, status, rolled_back)
            "running-1": ("twin", 0, "vm-creation", None),
            "running-2": ("twin", 0, "vm-creation", None),
            "failed-left": ("left", 1, "failed", 0),
            "rolled-back": ("undone", 1, "failed", 1),
            "completed": ("done", 1, "completed", None),
        }
        async with engine.begin() as conn:
            for job, (vm_name, ended, status, rolled_back) in jobs.items():
                await conn.execute(text(
                    "INSERT INTO failover_jobs (job_id, vm_id, job_type, status, source_vm_name, created_at,"
                    " updated_at, request_id, correlation_id, ended, rolled_back) VALUES (:j, :j, 'live', :s, :n,"
                    " UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), :j, :j, :e, :r)"),
                    {"j": job, "s": status, "n": vm_name, "e": ended, "r": rolled_back})
                await conn.execute(text(
                    "INSERT INTO resource_ledger (job_id, resource_key, resource_type, action, name, status,"
                    " created_at, updated_at) VALUES (:j, 'vm', 'vm', 'create', :n, 'intended', UTC_TIMESTAMP(6),"
                    " UTC_TIMESTAMP(6))"), {"j": job, "n": vm_name})
        await asyncio.to_thread(upgrade, url)
        async with engine.connect() as conn:
            claims = dict((await conn.execute(text("SELECT name, job_id FROM vm_name_claims"))).all())
        assert claims == {"twin": "running-1", "left": "failed-left"}
    finally:
        await engine.dispose()
        await _drop(database_url, name)
