"""Node JSON: the attributes and run list one chef-solo run gets.

Two steps, both pure functions over plain data (the server builds the inputs from its rows):

1. ``build_cluster(cluster)`` runs once per cluster version and builds a ``ClusterView``: the
   ``scalarium`` namespace (stack, layers with their online instances keyed by hostname, apps),
   the instance-independent parts of the OpsWorks-compatible view (``opsworks.stack``,
   ``opsworks.layers``, ``opsworks.applications``) and one ``deploy`` entry per app. Cost is
   O(instances + layers + apps): each instance is visited once.
2. ``node_json(view, instance_id, event, ...)`` builds one instance's document. It adds only what
   differs per instance (this instance, activity, run list, deployment) and merges the custom JSON
   levels on top; the cluster-wide parts are shared *by reference* with the view, never copied.
   Documents are therefore read-only: serialise them (``dumps``) rather than editing them.

Document layout, lowest precedence first:
  built-in defaults < generated ``opsworks`` / ``deploy`` / ``opsworks_custom_cookbooks``
  < stack custom JSON < layer custom JSON (layer order) < instance attributes
  < deployment custom JSON.
As in OpsWorks, custom JSON may override ``deploy.<app>`` and ``opsworks`` keys (the usual way to
pin a revision or add environment variables). ``scalarium`` and ``run_list`` are set last and
cannot be overridden: they are the cluster picture and the command, not configuration.

Secure app environment variables are included in clear: node JSON is only ever sent to the node
it was built for, over the signed agent channel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

from chef_bridge.attributes import deep_merge, merge_precedence

# --- input shapes -------------------------------------------------------------------------------


class AppSource(TypedDict):
    """Where an app's code comes from."""

    type: str  # "git" | "archive" | "s3" (passed through as scm_type)
    url: str
    revision: NotRequired[str | None]
    ssh_key: NotRequired[str | None]
    user: NotRequired[str | None]
    password: NotRequired[str | None]


class EnvVar(TypedDict):
    """One app environment variable; `secure` ones are masked in the API, not here."""

    value: str
    secure: bool


class StackInput(TypedDict):
    """A stack row. Extra keys are ignored."""

    id: str
    name: str
    region: str
    default_os: str
    chef_version: str
    custom_json: dict[str, Any]
    custom_cookbooks_source: dict[str, Any] | None
    default_ssh_key_name: NotRequired[str | None]
    vpc_id: NotRequired[str | None]
    elb_load_balancers: NotRequired[list[dict[str, Any]]]  # opsworks.stack["elb-load-balancers"]
    rds_instances: NotRequired[list[dict[str, Any]]]


class LayerInput(TypedDict):
    """A layer row; `recipes` maps each lifecycle event to recipe names."""

    id: str
    shortname: str
    name: str
    type: str
    recipes: dict[str, list[str]]
    custom_json: dict[str, Any]
    packages: list[str]
    auto_healing: bool


class InstanceInput(TypedDict):
    """An instance row; `attributes` is the instance-level attribute JSON."""

    id: str
    hostname: str
    status: str
    layer_ids: list[str]
    private_ip: str | None
    public_ip: str | None
    private_dns_name: str | None
    public_dns_name: str | None
    availability_zone: str | None
    instance_type: str | None
    os: str | None
    architecture: str | None
    ec2_instance_id: str | None  # None for manual (registered) instances
    attributes: dict[str, Any]
    elastic_ip: NotRequired[str | None]
    created_at: NotRequired[str | None]  # ISO 8601
    booted_at: NotRequired[str | None]
    backends: NotRequired[int]
    agent_version: NotRequired[str | None]


class AppInput(TypedDict):
    """An app row. `layer_ids` absent or None means every layer of the stack."""

    id: str
    shortname: str
    name: str
    type: str
    source: AppSource
    domains: list[str]
    environment: dict[str, EnvVar]
    attributes: dict[str, Any]  # deploy_to, document_root, migrate, user, ... (override defaults)
    enable_ssl: bool
    layer_ids: NotRequired[list[str] | None]
    ssl: NotRequired[dict[str, Any] | None]  # certificate, private_key, chain
    data_sources: NotRequired[list[dict[str, Any]]]  # [{"type", "database_name", "arn"?}]


class ClusterInput(TypedDict):
    """Everything `build_cluster` needs for one cluster version."""

    version: int
    stack: StackInput
    layers: list[LayerInput]
    instances: list[InstanceInput]
    apps: list[AppInput]


class DeploymentInput(TypedDict):
    """The deployment a command belongs to. `recipes` is for execute_recipes."""

    id: str
    command: str
    custom_json: dict[str, Any]
    app_ids: list[str] | None
    recipes: NotRequired[list[str]]


# --- vocabulary ---------------------------------------------------------------------------------


class Event(StrEnum):
    """Lifecycle events; each layer binds recipes to them."""

    SETUP = "setup"
    CONFIGURE = "configure"
    DEPLOY = "deploy"
    UNDEPLOY = "undeploy"
    SHUTDOWN = "shutdown"


ONLINE = "online"
LIFECYCLE_EVENTS = frozenset(e.value for e in Event)
# A rollback redeploys an older revision, so it runs the layers' deploy recipes.
RECIPE_EVENT_OF = {"rollback": Event.DEPLOY.value}
# Activities whose `deploy` attribute lists only the deployment's apps (OpsWorks did the same).
DEPLOY_ACTIVITIES = frozenset({"deploy", "undeploy", "rollback"})

DEFAULT_BACKENDS = 8  # OpsWorks derived it from memory and cores; rows may set `backends`.
DEFAULTS: dict[str, Any] = {
    "opsworks": {"deploy_chef_provider": "Timestamped", "run_cookbook_tests": False},
}

_RECIPE_RE = re.compile(r"^([A-Za-z0-9_.-]+)(?:::([A-Za-z0-9_.-]+))?(@[0-9][0-9.]*)?$")
_ROLE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_BRACKET_RE = re.compile(r"^(recipe|role)\[(.*)\]$")


class NodeJsonError(ValueError):
    """Bad input for node JSON; `code` is machine-readable."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# --- run lists ----------------------------------------------------------------------------------


def normalise_entry(entry: str) -> str:
    """Return a run-list entry as `recipe[cb::r]` / `recipe[cb]` / `role[x]`."""
    text = entry.strip()
    bracket = _BRACKET_RE.match(text)
    kind, name = (bracket.group(1), bracket.group(2).strip()) if bracket else ("recipe", text)
    valid = _ROLE_RE.match(name) if kind == "role" else _RECIPE_RE.match(name)
    if not valid:
        raise NodeJsonError(f"invalid run-list entry {entry!r}", "invalid_run_list_entry")
    return f"{kind}[{name}]"


def _dedup_key(normalised: str) -> str:
    """`recipe[cb]` and `recipe[cb::default]` name the same recipe."""
    if normalised.startswith("recipe[") and "::" not in normalised:
        name, _, version = normalised[7:-1].partition("@")
        return f"recipe[{name}::default{'@' + version if version else ''}]"
    return normalised


def run_list(
    layers: Sequence[LayerInput],
    layer_ids_of_instance: Iterable[str],
    event: str,
    extra: Sequence[str] | None = None,
    *,
    base: Sequence[str] = (),
) -> list[str]:
    """The run list for one instance: base (setup only), layer recipes, then `extra`."""
    member = set(layer_ids_of_instance)
    recipe_event = RECIPE_EVENT_OF.get(event, event)
    entries: list[str] = list(base) if event == Event.SETUP else []
    if recipe_event in LIFECYCLE_EVENTS:
        for layer in layers:
            if layer["id"] in member:
                entries.extend(layer["recipes"].get(recipe_event, ()))
    entries.extend(extra or ())
    result: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        normalised = normalise_entry(entry)
        key = _dedup_key(normalised)
        if key not in seen:
            seen.add(key)
            result.append(normalised)
    return result


def recipe_names(entries: Iterable[str]) -> list[str]:
    """`cb::r` names of the recipe entries of a normalised run list (roles dropped)."""
    names = []
    for entry in entries:
        if entry.startswith("recipe["):
            name = entry[7:-1].partition("@")[0]
            names.append(name if "::" in name else f"{name}::default")
    return names


# --- the cluster view ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """The instance-independent node JSON parts of one cluster version; treat as immutable."""

    version: int
    stack: StackInput
    layers: tuple[LayerInput, ...]
    layer_by_id: dict[str, LayerInput]
    instance_by_id: dict[str, InstanceInput]
    app_by_id: dict[str, AppInput]
    defaults: dict[str, Any]
    base_recipes: tuple[str, ...]
    scalarium: dict[str, Any]  # shared part of the `scalarium` namespace
    opsworks: dict[str, Any]  # shared part of the `opsworks` namespace
    deploy_by_app_id: dict[str, dict[str, Any]]
    app_ids_by_layer: dict[str, list[str]]
    app_ids_everywhere: list[str]
    # Caches filled on demand; both are derived data, so a lost race only repeats work.
    _deploy_cache: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict, repr=False)
    _fragments: dict[int, list[Any]] = field(default_factory=dict, repr=False)

    def instance_layers(self, instance: InstanceInput) -> list[LayerInput]:
        """The instance's layers, in the stack's layer order."""
        member = set(instance["layer_ids"])
        return [layer for layer in self.layers if layer["id"] in member]


def _scalarium_member(instance: InstanceInput) -> dict[str, Any]:
    return {
        "id": instance["id"],
        "hostname": instance["hostname"],
        "status": instance["status"],
        "private_ip": instance.get("private_ip"),
        "public_ip": instance.get("public_ip"),
        "private_dns_name": instance.get("private_dns_name"),
        "public_dns_name": instance.get("public_dns_name"),
        "availability_zone": instance.get("availability_zone"),
        "instance_type": instance.get("instance_type"),
    }


def _opsworks_member(instance: InstanceInput, region: str | None) -> dict[str, Any]:
    """An entry of opsworks.layers.<layer>.instances, with the keys the reference lists."""
    return {
        "aws_instance_id": instance.get("ec2_instance_id"),
        "availability_zone": instance.get("availability_zone"),
        "backends": instance.get("backends", DEFAULT_BACKENDS),
        "booted_at": instance.get("booted_at"),
        "created_at": instance.get("created_at"),
        "elastic_ip": instance.get("elastic_ip"),
        "instance_type": instance.get("instance_type"),
        "ip": instance.get("public_ip"),
        "private_dns_name": instance.get("private_dns_name"),
        "private_ip": instance.get("private_ip"),
        "public_dns_name": instance.get("public_dns_name"),
        "region": region,
        "status": instance["status"],
    }


def _scm(source: AppSource) -> dict[str, Any]:
    return {
        "scm_type": source["type"],
        "repository": source["url"],
        "revision": source.get("revision"),
        "ssh_key": source.get("ssh_key"),
        "user": source.get("user"),
        "password": source.get("password"),
    }


def _database(app: AppInput) -> dict[str, Any]:
    database: dict[str, Any] = dict(app["attributes"].get("database") or {})
    sources = app.get("data_sources") or []
    if sources:
        database.setdefault("data_source_provider", sources[0].get("type"))
        database.setdefault("database", sources[0].get("database_name"))
    return database


def deploy_entry(app: AppInput) -> dict[str, Any]:
    """`deploy.<app>` with OpsWorks key names and defaults; app attributes override defaults."""
    shortname = app["shortname"]
    env = {name: var["value"] for name, var in app["environment"].items()}
    ssl = (app.get("ssl") or {}) if app["enable_ssl"] else {}
    entry: dict[str, Any] = {
        "application": shortname,
        "application_type": app["type"],
        "auto_bundle_on_deploy": True,
        "database": _database(app),
        "deploy_to": f"/srv/www/{shortname}",
        "document_root": None,
        "domains": list(app["domains"]),
        "environment": env,
        "environment_variables": env,
        "group": "www-data",
        "keep_releases": 5,
        "memcached": {"host": None, "port": 11211},
        "migrate": False,
        "mounted_at": None,
        "purge_before_symlink": ["log", "tmp/pids", "public/system"],
        "rails_env": "production" if app["type"] == "rails" else None,
        "restart_command": None,
        "scm": _scm(app["source"]),
        "ssl_certificate": ssl.get("certificate"),
        "ssl_certificate_ca": ssl.get("chain"),
        "ssl_certificate_key": ssl.get("private_key"),
        "ssl_support": bool(app["enable_ssl"]),
        "stack": {"needs_reload": True},
        "symlink_before_migrate": {
            "config/database.yml": "config/database.yml",
            "config/memcached.yml": "config/memcached.yml",
        },
        "symlinks": {"system": "public/system", "pids": "tmp/pids", "log": "log"},
        "user": "deploy",
    }
    entry.update((k, v) for k, v in app["attributes"].items() if k != "database")
    return entry


def _scalarium_app(app: AppInput) -> dict[str, Any]:
    """Descriptive app data for the cluster picture; credentials stay in `deploy` only."""
    source = app["source"]
    return {
        "id": app["id"],
        "shortname": app["shortname"],
        "name": app["name"],
        "type": app["type"],
        "domains": list(app["domains"]),
        "layer_ids": app.get("layer_ids"),
        "enable_ssl": bool(app["enable_ssl"]),
        "source": {
            "type": source["type"],
            "url": source["url"],
            "revision": source.get("revision"),
        },
    }


def build_cluster(
    cluster: ClusterInput,
    *,
    defaults: Mapping[str, Any] | None = None,
    base_recipes: Sequence[str] = (),
) -> ClusterView:
    """Build the shared parts of every node JSON of one cluster version, in O(n) time."""
    stack = cluster["stack"]
    region = stack.get("region")
    layer_by_id: dict[str, LayerInput] = {}
    sc_layers: dict[str, dict[str, Any]] = {}
    ow_layers: dict[str, dict[str, Any]] = {}
    for layer in cluster["layers"]:
        shortname = layer["shortname"]
        if layer["id"] in layer_by_id or shortname in sc_layers:
            raise NodeJsonError(f"layer {shortname}: duplicate id or shortname", "duplicate_layer")
        layer_by_id[layer["id"]] = layer
        sc_layers[shortname] = {
            "id": layer["id"],
            "shortname": shortname,
            "name": layer["name"],
            "type": layer["type"],
            "packages": list(layer.get("packages") or []),
            "auto_healing": bool(layer.get("auto_healing")),
            "instances": {},
        }
        ow_layers[shortname] = {"id": layer["id"], "name": layer["name"], "instances": {}}

    instance_by_id: dict[str, InstanceInput] = {}
    online_hostnames: set[str] = set()
    for instance in cluster["instances"]:
        if instance["id"] in instance_by_id:
            raise NodeJsonError(f"instance {instance['id']}: listed twice", "duplicate_instance")
        instance_by_id[instance["id"]] = instance
        for layer_id in instance["layer_ids"]:
            if layer_id not in layer_by_id:
                raise NodeJsonError(
                    f"instance {instance['id']}: unknown layer {layer_id}", "unknown_layer"
                )
        if instance["status"] != ONLINE:
            continue
        hostname = instance["hostname"]
        if hostname in online_hostnames:
            raise NodeJsonError(f"hostname {hostname}: used twice", "duplicate_hostname")
        online_hostnames.add(hostname)
        # One entry object per instance, shared by every layer it belongs to.
        sc_member = _scalarium_member(instance)
        ow_member = _opsworks_member(instance, region)
        for layer_id in instance["layer_ids"]:
            shortname = layer_by_id[layer_id]["shortname"]
            sc_layers[shortname]["instances"][hostname] = sc_member
            ow_layers[shortname]["instances"][hostname] = ow_member

    app_by_id: dict[str, AppInput] = {}
    sc_apps: dict[str, dict[str, Any]] = {}
    applications: list[dict[str, Any]] = []
    deploy_by_app_id: dict[str, dict[str, Any]] = {}
    app_ids_by_layer: dict[str, list[str]] = {layer_id: [] for layer_id in layer_by_id}
    app_ids_everywhere: list[str] = []
    for app in cluster["apps"]:
        if app["id"] in app_by_id or app["shortname"] in sc_apps:
            raise NodeJsonError(f"app {app['shortname']}: duplicate id/shortname", "duplicate_app")
        app_by_id[app["id"]] = app
        sc_apps[app["shortname"]] = _scalarium_app(app)
        applications.append(
            {"name": app["name"], "slug_name": app["shortname"], "application_type": app["type"]}
        )
        deploy_by_app_id[app["id"]] = deploy_entry(app)
        layer_ids = app.get("layer_ids")
        if layer_ids is None:
            app_ids_everywhere.append(app["id"])
            continue
        for layer_id in layer_ids:
            if layer_id not in app_ids_by_layer:
                raise NodeJsonError(f"app {app['id']}: unknown layer {layer_id}", "unknown_layer")
            app_ids_by_layer[layer_id].append(app["id"])

    sc_stack = {
        "id": stack["id"],
        "name": stack["name"],
        "region": region,
        "default_os": stack.get("default_os"),
        "chef_version": stack.get("chef_version"),
        "vpc_id": stack.get("vpc_id"),
        "default_ssh_key_name": stack.get("default_ssh_key_name"),
        # The source itself may hold credentials; the agent fetches the bundle, not the source.
        "use_custom_cookbooks": stack.get("custom_cookbooks_source") is not None,
    }
    ow_stack = {
        "id": stack["id"],
        "name": stack["name"],
        "vpc_id": stack.get("vpc_id"),
        "elb-load-balancers": list(stack.get("elb_load_balancers") or []),
        "rds_instances": list(stack.get("rds_instances") or []),
    }
    view = ClusterView(
        version=cluster["version"],
        stack=stack,
        layers=tuple(cluster["layers"]),
        layer_by_id=layer_by_id,
        instance_by_id=instance_by_id,
        app_by_id=app_by_id,
        defaults=dict(DEFAULTS if defaults is None else defaults),
        base_recipes=tuple(base_recipes),
        scalarium={
            "cluster_version": cluster["version"],
            "stack": sc_stack,
            "layers": sc_layers,
            "apps": sc_apps,
        },
        opsworks={"stack": ow_stack, "layers": ow_layers, "applications": applications},
        deploy_by_app_id=deploy_by_app_id,
        app_ids_by_layer=app_ids_by_layer,
        app_ids_everywhere=app_ids_everywhere,
    )
    _register_fragments(view)
    return view


# --- one instance -------------------------------------------------------------------------------


def _opsworks_instance(
    instance: InstanceInput, layers: list[LayerInput], region: str | None
) -> dict[str, Any]:
    """opsworks.instance, with the keys the reference lists."""
    return {
        "architecture": instance.get("architecture"),
        "availability_zone": instance.get("availability_zone"),
        "aws_instance_id": instance.get("ec2_instance_id"),
        "backends": instance.get("backends", DEFAULT_BACKENDS),
        "hostname": instance["hostname"],
        "id": instance["id"],
        "instance_type": instance.get("instance_type"),
        "ip": instance.get("public_ip"),
        "layers": [layer["shortname"] for layer in layers],
        "private_dns_name": instance.get("private_dns_name"),
        "private_ip": instance.get("private_ip"),
        "public_dns_name": instance.get("public_dns_name"),
        "region": region,
    }


def _scalarium_instance(instance: InstanceInput, layers: list[LayerInput]) -> dict[str, Any]:
    return {
        **_scalarium_member(instance),
        "layers": [layer["shortname"] for layer in layers],
        "layer_ids": [layer["id"] for layer in layers],
        "os": instance.get("os"),
        "architecture": instance.get("architecture"),
        "ec2_instance_id": instance.get("ec2_instance_id"),
    }


def _deploy_for_layers(view: ClusterView, layers: list[LayerInput]) -> dict[str, Any]:
    """`deploy` for every app of these layers; shared by instances with the same layers."""
    key = tuple(layer["id"] for layer in layers)
    cached = view._deploy_cache.get(key)
    if cached is not None:
        return cached
    wanted = set(view.app_ids_everywhere)
    for layer_id in key:
        wanted.update(view.app_ids_by_layer[layer_id])
    result: dict[str, Any] = {}
    for app_id, app in view.app_by_id.items():  # stack app order, whatever the layer order
        if app_id in wanted:
            result[app["shortname"]] = view.deploy_by_app_id[app_id]
    view._deploy_cache[key] = result
    return result


def _deploy_for(
    view: ClusterView,
    layers: list[LayerInput],
    event: str,
    deployment: DeploymentInput | None,
) -> dict[str, Any]:
    app_ids = deployment.get("app_ids") if deployment else None
    if event not in DEPLOY_ACTIVITIES or app_ids is None:
        return _deploy_for_layers(view, layers)
    result: dict[str, Any] = {}
    for app_id in app_ids:
        app = view.app_by_id.get(app_id)
        if app is None:
            raise NodeJsonError(f"deployment: unknown app {app_id}", "unknown_app")
        result[app["shortname"]] = view.deploy_by_app_id[app_id]
    return result


def _epoch(sent_at: str | None) -> int | None:
    """OpsWorks' opsworks.sent_at is a number (seconds since the epoch)."""
    if sent_at is None:
        return None
    try:
        return int(datetime.fromisoformat(sent_at).timestamp())
    except ValueError as exc:
        raise NodeJsonError(f"sent_at {sent_at!r} is not ISO 8601", "invalid_sent_at") from exc


def node_json(
    view: ClusterView,
    instance_id: str,
    event: str,
    *,
    command_id: str,
    deployment: DeploymentInput | None = None,
    sent_at: str | None = None,
    extra_recipes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The full node JSON for one instance (which need not be online, e.g. during setup)."""
    instance = view.instance_by_id.get(instance_id)
    if instance is None:
        raise NodeJsonError(f"instance {instance_id}: not in the cluster", "unknown_instance")
    layers = view.instance_layers(instance)
    if extra_recipes is None and deployment is not None:
        extra_recipes = deployment.get("recipes")
    recipes = run_list(
        view.layers, instance["layer_ids"], event, extra_recipes, base=view.base_recipes
    )
    deployment_id = deployment["id"] if deployment else None
    generated = {
        "opsworks": {
            **view.opsworks,
            "activity": event,
            "agent_version": instance.get("agent_version"),
            "deployment": deployment_id if event in DEPLOY_ACTIVITIES else None,
            "instance": _opsworks_instance(instance, layers, view.stack.get("region")),
            "sent_at": _epoch(sent_at),
        },
        "deploy": _deploy_for(view, layers, event, deployment),
        "opsworks_custom_cookbooks": {
            "enabled": view.stack.get("custom_cookbooks_source") is not None,
            "recipes": recipe_names(recipes),
        },
    }
    document = merge_precedence(
        deep_merge(view.defaults, generated),
        view.stack.get("custom_json"),
        [layer.get("custom_json") for layer in layers],
        instance.get("attributes"),
        deployment.get("custom_json") if deployment else None,
    )
    document["scalarium"] = {
        **view.scalarium,
        "instance": _scalarium_instance(instance, layers),
        "activity": event,
        "command_id": command_id,
        "deployment_id": deployment_id,
        "sent_at": sent_at,
    }
    document["run_list"] = recipes
    return document


# --- chef-solo local-mode search ----------------------------------------------------------------


def search_nodes(view: ClusterView) -> dict[str, dict[str, Any]]:
    """One Chef node document per online instance, keyed by hostname, for `search(:node, ...)`.

    Written as `nodes/<hostname>.json` for chef-solo local mode. Each node's run list is its
    layers as roles, and `automatic.roles` lists them too, so both `search(:node, "role:lb")`
    and `search(:node, "roles:lb")` find a layer's members. Only cluster facts are included,
    never custom JSON or app secrets: other nodes' documents are visible to every recipe.
    """
    region = view.stack.get("region")
    nodes: dict[str, dict[str, Any]] = {}
    for instance in view.instance_by_id.values():
        if instance["status"] != ONLINE:
            continue
        layers = view.instance_layers(instance)
        shortnames = [layer["shortname"] for layer in layers]
        hostname = instance["hostname"]
        nodes[hostname] = {
            "name": hostname,
            "chef_type": "node",
            "json_class": "Chef::Node",
            "chef_environment": "_default",
            "automatic": {
                "hostname": hostname,
                "fqdn": instance.get("private_dns_name") or hostname,
                "ipaddress": instance.get("private_ip"),
                "roles": shortnames,
                "cloud": {
                    "local_ipv4": instance.get("private_ip"),
                    "public_ipv4": instance.get("public_ip"),
                },
            },
            "normal": {
                "scalarium": {"instance": _scalarium_instance(instance, layers)},
                "opsworks": {"instance": _opsworks_instance(instance, layers, region)},
            },
            "default": {},
            "override": {},
            "run_list": [f"role[{shortname}]" for shortname in shortnames],
        }
    return nodes


# --- serialisation ------------------------------------------------------------------------------


def _register_fragments(view: ClusterView) -> None:
    """Mark the large shared sub-trees whose JSON text `dumps` may compute once and reuse."""
    shared: list[Any] = [view.scalarium["stack"], view.opsworks["stack"]]
    for container in (view.scalarium["layers"], view.opsworks["layers"]):
        shared.append(container)
        for layer in container.values():
            shared.extend((layer, layer["instances"]))
    shared.extend((view.scalarium["apps"], view.opsworks["applications"]))
    shared.extend(view.deploy_by_app_id.values())
    for obj in shared:
        # Keep the object itself so its id() cannot be reused while the view lives.
        view._fragments[id(obj)] = [obj, None]


_SEPARATORS = (",", ":")


def dumps(view: ClusterView, document: Mapping[str, Any]) -> str:
    """Serialise a document of `view`: the text of json.dumps(doc, separators=(",", ":")).

    The cluster-wide sub-trees are encoded once per view and spliced in, so serialising every
    instance's document costs a copy of the text, not a re-encoding of the whole cluster.
    """
    out: list[str] = []
    _encode(document, view._fragments, out)
    return "".join(out)


def _encode(value: Any, fragments: dict[int, list[Any]], out: list[str]) -> None:
    entry = fragments.get(id(value))
    if entry is not None and entry[0] is value:
        if entry[1] is None:
            entry[1] = json.dumps(value, separators=_SEPARATORS)
        out.append(entry[1])
        return
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(",")
            out.append(json.dumps(key))
            out.append(":")
            _encode(item, fragments, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, fragments, out)
        out.append("]")
    else:
        out.append(json.dumps(value, separators=_SEPARATORS))
