"""Apply the Alembic migrations that ship inside the package (`failoverctl db upgrade`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import make_url

from .engine import make_engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations, from any working directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    return cfg


async def ensure_database(url: str) -> None:
    """Create the URL's database when it does not exist yet (utf8mb4)."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        raise ValueError(
            "FAILOVER_DATABASE_URL names no database: add one, e.g. mysql+asyncmy://user@host/failover"
        )
    server = make_engine(parsed.set(database="").render_as_string(hide_password=False), pool_size=1)
    try:
        async with server.begin() as conn:
            exists = (
                await conn.execute(
                    text("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :n"),
                    {"n": name},
                )
            ).first()
            if not exists:
                quoted = name.replace("`", "``")
                await conn.execute(text(f"CREATE DATABASE `{quoted}` CHARACTER SET utf8mb4"))
    finally:
        await server.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (runs its own event loop)."""
    command.upgrade(alembic_config(url), revision)
