"""The Flask app factory."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from server import db, enrollment, queue
from server.config import Settings, load_settings
from server.errors import ScalariumError, unexpected_error
from server.vault import Vault, load_or_create_key

MAX_BODY_BYTES = 1024 * 1024

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def create_app(config: Settings | None = None) -> Flask:
    """Build the app; nothing connects or reads the environment before this is called."""
    settings = config if config is not None else load_settings()
    app = Flask(__name__)
    app.config["SCALARIUM"] = settings
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.extensions["scalarium.vault"] = Vault(
        load_or_create_key(settings.data_dir, settings.secret_key)
    )
    db.init_app(app)
    queue.init_app(app)
    enrollment.init_app(app)
    _register_errors(app)

    from server.api import (  # noqa: F401
        agent,
        apps,
        bootstrap,
        cookbooks,
        deployments,
        instances,
        layers,
        stacks,
        system,
        userdata,
    )
    from server.api.v1 import v1

    app.register_blueprint(v1.blueprint)
    agent.init_app(app)
    bootstrap.init_app(app)
    _install_orchestrator_hooks(app)
    return app


def _install_orchestrator_hooks(app: Flask) -> None:
    from server import runtime

    runtime.install_hooks(queue.get_redis(app), app.extensions["scalarium.keys"])


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ScalariumError)
    def _scalarium_error(error: ScalariumError) -> Any:
        return jsonify(error.to_dict()), error.status

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Any:
        status = error.code or 500
        body = ScalariumError(
            error.description or error.name, code=_HTTP_CODES.get(status, f"http_{status}")
        ).to_dict()
        response = jsonify(body)
        if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Any:
        return jsonify(unexpected_error(error).to_dict()), 500
