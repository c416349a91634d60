"""Schema migrations (Alembic) and first-start setup."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import select

from server.access import create_token
from server.config import Settings
from server.db import Database
from server.models import ApiToken

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our migrations and the given database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database schema up to a revision (head by default)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def ensure_admin_token(settings: Settings, database: Database) -> str | None:
    """On first start create an admin token, write it to var/admin-token (0600), return it once."""
    with database.session() as session:
        exists = session.scalar(select(ApiToken.id).where(ApiToken.is_admin.is_(True)).limit(1))
        if exists is not None:
            return None
        _, plaintext = create_token(session, "admin", admin=True)
    path = settings.data_dir / "admin-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(plaintext + "\n")
    os.chmod(path, 0o600)
    return plaintext
