"""Fixtures of the crash tests: the private servers (servers.py) and cells (support.py)."""

from __future__ import annotations

from .servers import private_mariadb, private_rabbitmq  # noqa: F401 - fixtures
