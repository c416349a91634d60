"""Shared fixtures: the app on SQLite and on PostgreSQL, the machine's Redis, API helpers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from server.access import create_token
from server.api.agent import get_wakeups
from server.app import create_app
from server.config import Settings, load_settings
from server.db import Base, get_database
from server.migrate import upgrade
from server.models import Role
from server.queue import get_redis

# Each test run gets its own PostgreSQL database and (as far as 15 go) its own Redis database,
# so that two runs on one machine do not flush or drop each other's data.
REDIS_URL = os.environ.get(
    "SCALARIUM_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}"
)
PG_ADMIN_URL = os.environ.get(
    "SCALARIUM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PG_DB = os.environ.get("SCALARIUM_TEST_PG_DB", f"scalarium_test_{os.getpid()}")
PG_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + PG_DB


def _reset_postgres() -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {PG_DB}"))
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database migrated to head, once per session, dropped afterwards."""
    _reset_postgres()
    upgrade(PG_URL)
    yield PG_URL
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once; each test copies it."""
    path = tmp_path_factory.mktemp("template") / "scalarium.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """The machine's Redis, on a test database emptied before and after."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_template: Path,
    redis_client: redis.Redis,
) -> Settings:
    """Settings for one test, on each database backend in turn."""
    if request.param == "sqlite":
        db_file = tmp_path / "scalarium.db"
        shutil.copy(sqlite_template, db_file)
        url = f"sqlite:///{db_file}"
    else:
        url = request.getfixturevalue("postgres_url")
        engine = create_engine(url)
        with engine.begin() as conn:
            tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        engine.dispose()
    return load_settings(
        {},
        data_dir=str(tmp_path / "var"),
        database_url=url,
        redis_url=REDIS_URL,
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    """The Flask app under test."""
    application = create_app(settings)
    application.config["TESTING"] = True
    yield application
    get_wakeups(application).close()
    get_database(application).dispose()
    get_redis(application).close()


@dataclass
class Api:
    """Calls the API as one token."""

    client: FlaskClient
    token: str

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """One request; returns the test response."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kw.pop("headers", {}))
        return self.client.open(f"/api/v1{path}", method=method, json=body, headers=headers, **kw)

    def ok(self, method: str, path: str, body: Any = None, status: int | None = None) -> Any:
        """A request that must succeed; returns the JSON body."""
        response = self.call(method, path, body)
        expected = status or (201 if method == "POST" else 200)
        assert response.status_code == expected, response.get_json()
        return response.get_json()

    def error(self, method: str, path: str, body: Any, status: int, code: str) -> dict[str, Any]:
        """A request that must fail with this status and code; returns the error."""
        response = self.call(method, path, body)
        payload = response.get_json()
        assert response.status_code == status, payload
        assert payload["error"]["code"] == code, payload
        assert set(payload["error"]) == {"code", "message", "details"}
        return payload["error"]  # type: ignore[no-any-return]


def make_token(
    app: Flask, name: str, admin: bool = False, roles: dict[str, Role] | None = None
) -> str:
    """Create a token directly in the database."""
    with get_database(app).session() as session:
        _, plaintext = create_token(session, name, admin=admin, roles=roles)
    return plaintext


@pytest.fixture
def admin(app: Flask) -> Api:
    """The API as an admin."""
    return Api(app.test_client(), make_token(app, "admin", admin=True))


@pytest.fixture
def as_role(app: Flask) -> Any:
    """A factory: the API as a token holding one role on one stack."""

    def make(stack_id: str, role: Role | None) -> Api:
        roles = {stack_id: role} if role else {}
        return Api(app.test_client(), make_token(app, f"t-{role}", roles=roles))

    return make
