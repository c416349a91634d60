"""Request and response schemas: one definition validates input and produces OpenAPI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.errors import Invalid

SHORTNAME = r"^[a-z0-9-]{1,32}$"
HOSTNAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_COOKBOOK = r"[A-Za-z0-9_.-]+(::[A-Za-z0-9_.-]+)?"
RECIPE = rf"^(recipe\[{_COOKBOOK}(@[0-9.]+)?\]|role\[[A-Za-z0-9_.-]+\]|{_COOKBOOK})$"
_MISSING = object()
MAX_OBJECT_BYTES = 256 * 1024

# Python type accepted for each JSON type; bool is excluded from integer explicitly.
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True)
class F:
    """One field: its JSON type and the rules a value must follow."""

    type: str
    required: bool = False
    nullable: bool = False
    default: Any = _MISSING
    max_length: int | None = None
    min_length: int | None = None
    pattern: str | None = None
    enum: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    items: F | None = None
    max_items: int | None = None
    properties: Mapping[str, F] | None = None  # a nested object with fixed keys
    values: F | None = None  # a free-keyed object whose values follow this field
    read_only: bool = False
    format: str | None = None
    description: str = ""

    def openapi(self) -> dict[str, Any]:
        """This field as an OpenAPI 3.0 schema object."""
        schema: dict[str, Any] = {"type": self.type}
        for key, value in (
            ("maxLength", self.max_length),
            ("minLength", self.min_length),
            ("pattern", self.pattern),
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("maxItems", self.max_items),
            ("format", self.format),
        ):
            if value is not None:
                schema[key] = value
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if self.nullable:
            schema["nullable"] = True
        if self.read_only:
            schema["readOnly"] = True
        if self.description:
            schema["description"] = self.description
        if self.items is not None:
            schema["items"] = self.items.openapi()
        if self.properties is not None:
            schema["properties"] = {k: v.openapi() for k, v in self.properties.items()}
            schema["additionalProperties"] = False
        elif self.type == "object":
            schema["additionalProperties"] = self.values.openapi() if self.values else True
        return schema


@dataclass(frozen=True)
class Schema:
    """A named object schema for a request or response body."""

    name: str
    fields: Mapping[str, F] = field(default_factory=dict)

    def openapi(self, *, for_update: bool = False) -> dict[str, Any]:
        """The schema as an OpenAPI object, with required fields unless for an update."""
        props = {k: v.openapi() for k, v in self.fields.items()}
        schema: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }
        required = [k for k, v in self.fields.items() if v.required and not for_update]
        if required:
            schema["required"] = required
        return schema

    def validate(self, data: Any, *, partial: bool = False) -> dict[str, Any]:
        """Check a request body; return it with defaults filled in, or raise Invalid."""
        if not isinstance(data, dict):
            raise Invalid(
                "the request body must be a JSON object",
                code="invalid_type",
                details={"errors": [{"field": "", "code": "invalid_type"}]},
            )
        errors: list[dict[str, str]] = []
        for key in data:
            if key not in self.fields or self.fields[key].read_only:
                errors.append(
                    {"field": key, "code": "unknown_field", "message": f"unknown field {key!r}"}
                )
        clean: dict[str, Any] = {}
        for key, rule in self.fields.items():
            if rule.read_only:
                continue
            if key in data:
                clean[key] = _check(key, data[key], rule, errors)
            elif partial:
                continue
            elif rule.required:
                errors.append(
                    {"field": key, "code": "missing_field", "message": f"{key} is required"}
                )
            elif rule.default is not _MISSING:
                default = rule.default
                clean[key] = default() if callable(default) else default
        if errors:
            first = errors[0]
            raise Invalid(first["message"], code=first["code"], details={"errors": errors})
        return clean


def _check(path: str, value: Any, rule: F, errors: list[dict[str, str]]) -> Any:
    """Validate one value against its rule, appending errors; returns the cleaned value."""
    if value is None:
        if not rule.nullable:
            _error(errors, path, "invalid_type", f"{path} is null")
        return None
    if not _is_type(value, rule.type):
        _error(errors, path, "invalid_type", f"{path} must be of type {rule.type}")
        return value
    if rule.enum is not None and value not in rule.enum:
        choices = ", ".join(map(str, rule.enum))
        _error(errors, path, "invalid_choice", f"{path} must be one of {choices}")
    checker = _CHECKERS.get(rule.type)
    return checker(path, value, rule, errors) if checker else value


def _is_type(value: Any, json_type: str) -> bool:
    # bool is a subclass of int in Python but not a number in JSON.
    if isinstance(value, bool):
        return json_type == "boolean"
    return isinstance(value, _PYTHON_TYPES[json_type])


def _check_string(path: str, value: str, rule: F, errors: list[dict[str, str]]) -> str:
    if rule.max_length is not None and len(value) > rule.max_length:
        _error(errors, path, "too_long", f"{path} is longer than {rule.max_length} characters")
    elif rule.min_length is not None and len(value) < rule.min_length:
        _error(errors, path, "too_short", f"{path} is too short")
    elif rule.pattern is not None and not re.fullmatch(rule.pattern, value):
        _error(errors, path, "invalid_format", f"{path} must match {rule.pattern}")
    return value


def _check_number(path: str, value: float, rule: F, errors: list[dict[str, str]]) -> float:
    if (rule.minimum is not None and value < rule.minimum) or (
        rule.maximum is not None and value > rule.maximum
    ):
        _error(errors, path, "out_of_range", f"{path} is out of range")
    return value


def _check_array(path: str, value: list[Any], rule: F, errors: list[dict[str, str]]) -> list[Any]:
    if rule.max_items is not None and len(value) > rule.max_items:
        _error(errors, path, "too_many_items", f"{path} has too many items")
    items = rule.items
    if items is None:
        return value
    return [_check(f"{path}[{i}]", v, items, errors) for i, v in enumerate(value)]


def _check_object(
    path: str, value: dict[str, Any], rule: F, errors: list[dict[str, str]]
) -> dict[str, Any]:
    if rule.properties is not None:
        for key in value:
            if key not in rule.properties:
                _error(errors, f"{path}.{key}", "unknown_field", f"unknown field {path}.{key}")
        out: dict[str, Any] = {}
        for key, sub in rule.properties.items():
            if key in value:
                out[key] = _check(f"{path}.{key}", value[key], sub, errors)
            elif sub.required:
                _error(errors, f"{path}.{key}", "missing_field", f"{path}.{key} is required")
        value = out
    elif rule.values is not None:
        values = rule.values
        value = {k: _check(f"{path}.{k}", v, values, errors) for k, v in value.items()}
    if _json_size(value) > MAX_OBJECT_BYTES:
        _error(errors, path, "too_large", f"{path} is larger than {MAX_OBJECT_BYTES} bytes")
    return value


_CHECKERS: dict[str, Callable[[str, Any, F, list[dict[str, str]]], Any]] = {
    "string": _check_string,
    "integer": _check_number,
    "number": _check_number,
    "array": _check_array,
    "object": _check_object,
}


def _error(errors: list[dict[str, str]], path: str, code: str, message: str) -> None:
    errors.append({"field": path, "code": code, "message": message})


def _json_size(value: Any) -> int:
    return len(json.dumps(value))


# ---------------------------------------------------------------- shared pieces


def _text(max_length: int = 128, **kw: Any) -> F:
    return F("string", max_length=max_length, **kw)


LIFECYCLE_EVENTS = ("setup", "configure", "deploy", "undeploy", "shutdown")
SHORTNAME_F = F("string", required=True, pattern=SHORTNAME, max_length=32)
RECIPE_LIST = F("array", items=F("string", pattern=RECIPE, max_length=255), max_items=200)
RECIPES = F(
    "object",
    properties={
        event: RECIPE_LIST for event in ("setup", "configure", "deploy", "undeploy", "shutdown")
    },
    default=dict,
)
JSON_OBJECT = F("object", default=dict)
ID = F("string", read_only=True, format="uuid")
TIMESTAMP = F("string", read_only=True, format="date-time")

COOKBOOK_SOURCE = F(
    "object",
    nullable=True,
    properties={
        "type": F(
            "string", required=True, enum=("git", "archive", "s3", "directory", "chef_server")
        ),
        "url": _text(2048, required=True),
        "revision": _text(255),
        "ssh_key": F("string", max_length=16384, description="write-only secret"),
        "username": _text(255),
        "password": F("string", max_length=1024, description="write-only secret"),
        "sha256": F("string", pattern=r"^[0-9a-f]{64}$"),
        "submodules": F("boolean"),
        "region": _text(32, pattern=r"^[a-z0-9-]{1,32}$"),
    },
)

STACK = Schema(
    "Stack",
    {
        "id": ID,
        "shortname": SHORTNAME_F,
        "name": _text(128, min_length=1),
        "description": _text(4096, default=""),
        "region": _text(32, pattern=r"^[a-z0-9-]{1,32}$", default="us-east-1"),
        "default_os": _text(64, min_length=1, default="ubuntu-22.04"),
        "default_instance_type": _text(32, min_length=1, default="t3.small"),
        "default_availability_zone": _text(32, nullable=True, default=None),
        "default_ssh_key_name": _text(255, nullable=True, default=None),
        "chef_version": _text(32, pattern=r"^[0-9]+(\.[0-9]+){0,2}$", default="18"),
        "chef_binary": F("string", enum=("cinc-solo", "chef-solo"), default="cinc-solo"),
        "use_custom_cookbooks": F("boolean", default=False),
        "custom_cookbooks_source": COOKBOOK_SOURCE,
        "custom_json": JSON_OBJECT,
        "cluster_version": F("integer", read_only=True),
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
    },
)

STACK_CLONE = Schema(
    "StackClone",
    {"shortname": SHORTNAME_F, "name": _text(128, min_length=1)},
)

LAYER = Schema(
    "Layer",
    {
        "id": ID,
        "stack_id": F("string", read_only=True),
        "shortname": SHORTNAME_F,
        "name": _text(128, min_length=1),
        "type": _text(32, pattern=r"^[a-z0-9_-]{1,32}$", default="custom"),
        "recipes": RECIPES,
        "custom_json": JSON_OBJECT,
        "packages": F(
            "array",
            items=F("string", pattern=r"^[A-Za-z0-9.+_:-]{1,128}$"),
            max_items=500,
            default=list,
        ),
        "auto_healing": F("boolean", default=True),
        "scaling": JSON_OBJECT,
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
    },
)

INSTANCE = Schema(
    "Instance",
    {
        "id": ID,
        "stack_id": F("string", read_only=True),
        "hostname": F("string", required=True, pattern=HOSTNAME, max_length=63),
        "layer_ids": F("array", required=True, items=F("string", max_length=36), max_items=50),
        "provider": F("string", enum=("ec2", "manual", "local"), default="manual"),
        "scaling_type": F("string", enum=("24/7", "time", "load"), default="24/7"),
        "instance_type": _text(32, nullable=True, default=None),
        "os": _text(64, nullable=True, default=None),
        "availability_zone": _text(32, nullable=True, default=None),
        "ami_id": _text(64, nullable=True, default=None),
        "attributes": JSON_OBJECT,
        "status": F("string", read_only=True),
        "architecture": F("string", read_only=True, nullable=True),
        "ec2_instance_id": F("string", read_only=True, nullable=True),
        "private_ip": F("string", read_only=True, nullable=True),
        "public_ip": F("string", read_only=True, nullable=True),
        "private_dns_name": F("string", read_only=True, nullable=True),
        "public_dns_name": F("string", read_only=True, nullable=True),
        "agent_version": F("string", read_only=True, nullable=True),
        "last_heartbeat_at": F("string", read_only=True, nullable=True),
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
    },
)

ENV_VAR = F(
    "object",
    properties={
        "value": F("string", required=True, max_length=65536),
        "secure": F("boolean"),
    },
)

APP = Schema(
    "App",
    {
        "id": ID,
        "stack_id": F("string", read_only=True),
        "shortname": SHORTNAME_F,
        "name": _text(128, min_length=1),
        "type": F(
            "string", enum=("other", "rails", "php", "nodejs", "java", "static"), default="other"
        ),
        "source": F(
            "object",
            properties={
                "type": F("string", required=True, enum=("git", "archive", "s3")),
                "url": _text(2048, required=True, min_length=1),
                "revision": _text(255),
                "ssh_key": F("string", max_length=16384, description="write-only secret"),
                "username": _text(255),
                "password": F("string", max_length=1024, description="write-only secret"),
            },
            default=dict,
        ),
        "domains": F(
            "array",
            items=F("string", pattern=r"^[A-Za-z0-9*.-]{1,253}$"),
            max_items=100,
            default=list,
        ),
        "environment": F(
            "object",
            values=ENV_VAR,
            default=dict,
            description="secure values are write-only and shown masked",
        ),
        "layer_ids": F("array", items=F("string", max_length=36), max_items=50, default=list),
        "attributes": JSON_OBJECT,
        "enable_ssl": F("boolean", default=False),
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
    },
)

COMMAND_TYPES = (
    "setup",
    "configure",
    "deploy",
    "rollback",
    "undeploy",
    "execute_recipes",
    "update_custom_cookbooks",
    "shutdown",
)

DEPLOYMENT = Schema(
    "Deployment",
    {
        "id": ID,
        "stack_id": F("string", read_only=True),
        "command": F("string", required=True, enum=COMMAND_TYPES),
        "app_id": F("string", nullable=True, max_length=36, default=None),
        "instance_ids": F(
            "array", items=F("string", max_length=36), max_items=10000, nullable=True, default=None
        ),
        "recipes": F(
            "array", items=F("string", pattern=RECIPE, max_length=255), max_items=200, default=list
        ),
        "custom_json": JSON_OBJECT,
        "comment": _text(1024, default=""),
        "status": F("string", read_only=True),
        "created_by": F("string", read_only=True, nullable=True),
        "created_at": TIMESTAMP,
        "finished_at": F("string", read_only=True, nullable=True),
        "commands": F("array", read_only=True),
    },
)

COMMAND = Schema(
    "Command",
    {
        "id": ID,
        "deployment_id": F("string", read_only=True, nullable=True),
        "instance_id": F("string", read_only=True),
        "type": F("string", read_only=True),
        "status": F("string", read_only=True),
        "cluster_version": F("integer", read_only=True),
        "exit_code": F("integer", read_only=True, nullable=True),
        "reason": F("string", read_only=True, nullable=True),
        "duration": F("number", read_only=True, nullable=True),
        "created_at": TIMESTAMP,
        "started_at": F("string", read_only=True, nullable=True),
        "finished_at": F("string", read_only=True, nullable=True),
    },
)

EVENT = Schema(
    "Event",
    {
        "id": F("integer", read_only=True),
        "stack_id": F("string", read_only=True, nullable=True),
        "instance_id": F("string", read_only=True, nullable=True),
        "kind": F("string", read_only=True),
        "message": F("string", read_only=True),
        "data": F("object", read_only=True),
        "actor": F("string", read_only=True, nullable=True),
        "created_at": TIMESTAMP,
    },
)

ALL_SCHEMAS = (STACK, STACK_CLONE, LAYER, INSTANCE, APP, DEPLOYMENT, COMMAND, EVENT)
