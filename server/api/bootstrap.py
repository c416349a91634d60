"""What a booting node downloads before it has an identity (/bootstrap/v1, unauthenticated).

Nothing here is secret: the install script and the agent are public code, the CA certificate
is public by nature. The token travels in the user-data, never in these URLs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from server.enrollment import get_ca_pem

# The node-side files live beside the server package in the source tree.
BOOTSTRAP_DIR = Path(__file__).resolve().parents[2] / "bootstrap"
URL_PLACEHOLDER = "@@SCALARIUM_URL@@"

blueprint = Blueprint("bootstrap_v1", __name__, url_prefix="/bootstrap/v1")


def init_app(app: Flask) -> None:
    """Register the blueprint."""
    app.register_blueprint(blueprint)


@functools.lru_cache(maxsize=8)
def _read(name: str) -> bytes:
    return (BOOTSTRAP_DIR / name).read_bytes()


def render_install_script(script: str, server_url: str) -> str:
    """The install script with the placeholder replaced by the server URL (bash-quoted)."""
    url = server_url.rstrip("/")
    # The placeholder sits inside single quotes in install.sh: close, escape, reopen.
    return script.replace(URL_PLACEHOLDER, url.replace("'", "'\\''"))


def _file(body: bytes | str, mimetype: str) -> Any:
    response = Response(body, mimetype=mimetype)
    # Small, public, and changed by upgrades: let clients revalidate cheaply.
    response.headers["Cache-Control"] = "no-cache"
    response.add_etag()
    return response.make_conditional(request)


@blueprint.get("/install.sh")
def install_sh() -> Any:
    """The install script nodes pipe into bash."""
    script = _read("install.sh").decode("utf-8")
    url = current_app.config["SCALARIUM"].public_url
    return _file(render_install_script(script, url), "text/x-shellscript")


@blueprint.get("/agent.py")
def agent_py() -> Any:
    """The agent program."""
    return _file(_read("agent.py"), "text/x-python")


@blueprint.get("/ca.pem")
def ca_pem() -> Any:
    """The CA certificate nodes verify the server with."""
    return _file(get_ca_pem(current_app), "application/x-pem-file")
