"""The `scalarium` command: the processes, administration, and a client for the REST API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from server.client import ApiError, Client
from server.config import describe, load_settings, mask_url

# What `list` prints for each resource: (column, key).
COLUMNS: dict[str, list[str]] = {
    "stacks": ["id", "shortname", "name", "region", "cluster_version"],
    "layers": ["id", "shortname", "name", "type", "auto_healing"],
    "instances": ["id", "hostname", "status", "provider", "instance_type", "private_ip"],
    "apps": ["id", "shortname", "name", "type", "domains"],
    "deployments": ["id", "command", "status", "app_id", "created_at", "created_by"],
    "commands": ["id", "instance_id", "type", "status", "exit_code", "duration"],
    "tokens": ["id", "name", "prefix", "admin", "roles", "revoked"],
}

# Which request field a resource's positional NAME fills, and which parent it belongs to.
RESOURCES = {
    "stacks": ("shortname", None),
    "layers": ("shortname", "stack"),
    "instances": ("hostname", "stack"),
    "apps": ("shortname", "stack"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `scalarium` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SCALARIUM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        result = args.run(args)
    except ApiError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        if exc.details:
            print(json.dumps(exc.details, indent=2), file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        problem = _database_problem(exc)
        if problem is None:
            raise
        print(f"error: database_unavailable: {problem}", file=sys.stderr)
        return 1
    return int(result or 0)


def _database_problem(exc: BaseException) -> str | None:
    """One line for a database that refused a server-side command (a missing database, a wrong
    password, a server that is down): the operator's to fix, no traceback needed."""
    errors = sys.modules.get("sqlalchemy.exc")
    if errors is None or not isinstance(exc, errors.OperationalError):
        return None
    reason = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
    where = mask_url(_settings().database_url)
    return f"cannot use the database {where}: {reason[0] if reason else type(exc).__name__}"


class UsageError(Exception):
    """The command line asks for something that cannot be done."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(prog="scalarium", description=__doc__)
    sub = parser.add_subparsers(title="commands")

    def command(
        name: str, run: Callable[[argparse.Namespace], Any], help_: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(run=run)
        return p

    command("config", cmd_config, "print the effective settings, secrets masked")
    db = sub.add_parser("db", help="database schema").add_subparsers(title="db commands")
    command("upgrade", cmd_db_upgrade, "create or upgrade the database schema", db)
    command("server", cmd_server, "serve the API (gunicorn)")
    p = command("worker", cmd_worker, "run an RQ worker")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    command("scheduler", cmd_scheduler, "run the periodic-job scheduler")
    command("up", cmd_up, "run everything on the embedded defaults (laptop or demo)")

    tokens = sub.add_parser("tokens", help="API tokens (run on the server host)")
    tsub = tokens.add_subparsers(title="token commands")
    p = command("create", cmd_tokens_create, "create a token and print it once", tsub)
    p.add_argument("name")
    p.add_argument("--admin", action="store_true")
    p.add_argument(
        "--role",
        action="append",
        default=[],
        metavar="STACK=ROLE",
        help="a role on a stack (id or shortname), e.g. prod=deployer; repeatable",
    )
    p = command("list", cmd_tokens_list, "list tokens", tsub)
    p.add_argument("--json", action="store_true")
    p = command("revoke", cmd_tokens_revoke, "revoke a token", tsub)
    p.add_argument("token_id")

    for resource, (name_field, parent) in RESOURCES.items():
        res = sub.add_parser(resource, help=f"manage {resource}").add_subparsers(
            title=f"{resource} commands"
        )
        p = command("list", cmd_list, f"list {resource}", res)
        _client_args(p, resource, parent)
        p = command("show", cmd_show, f"show one of the {resource}", res)
        _client_args(p, resource, parent, with_stack=resource == "stacks")
        p.add_argument("ref", metavar="ID" if resource != "stacks" else "STACK")
        p = command("create", cmd_create, f"create one of the {resource}", res)
        _client_args(p, resource, parent)
        p.add_argument("name", metavar=name_field.upper())
        _set_args(p)
        if resource == "instances":
            p.add_argument(
                "--layer", action="append", default=[], help="layer id or shortname; repeatable"
            )
        p = command("update", cmd_update, f"update one of the {resource}", res)
        _client_args(p, resource, parent, with_stack=resource == "stacks")
        p.add_argument("ref", metavar="ID" if resource != "stacks" else "STACK")
        _set_args(p)
        p = command("delete", cmd_delete, f"delete one of the {resource}", res)
        _client_args(p, resource, parent, with_stack=resource == "stacks")
        p.add_argument("ref", metavar="ID" if resource != "stacks" else "STACK")
        if resource == "instances":
            p = command(
                "user-data",
                cmd_user_data,
                "print an instance's user-data (issues a new one-time token; the old one dies)",
                res,
            )
            _client_args(p, resource, parent)
            p.add_argument("ref", metavar="INSTANCE", help="instance id or hostname")
            for action, text in LIFECYCLE_ACTIONS.items():
                p = command(action, cmd_instance_action, text, res)
                _client_args(p, resource, parent)
                p.add_argument("ref", metavar="INSTANCE", help="instance id or hostname")
                p.set_defaults(action=action)
        if resource == "stacks":
            p = command(
                "update-cookbooks",
                cmd_update_cookbooks,
                "fetch the custom cookbooks, build the bundle, send update_custom_cookbooks",
                res,
            )
            _client_args(p, resource, None, with_stack=True)
            p.add_argument("ref", metavar="STACK")
            p = command("clone", cmd_clone, "clone a stack's settings, layers and apps", res)
            _client_args(p, resource, None, with_stack=True)
            p.add_argument("ref", metavar="STACK")
            p.add_argument("shortname")
            p.add_argument("--name")
            p = command("events", cmd_events, "a stack's events, newest first", res)
            _client_args(p, resource, None, with_stack=True)
            p.add_argument("ref", metavar="STACK")
            p.add_argument("--limit", type=int, default=50)

    chef = sub.add_parser("chef", help="talk to an existing Chef Server").add_subparsers(
        title="chef commands"
    )
    p = command(
        "import",
        cmd_chef_import,
        "copy roles, environments, data bags and cookbooks from a Chef Server",
        chef,
    )
    p.add_argument("dest", metavar="DEST", help="a new (or empty) directory for the chef-repo")
    p.add_argument("--server", required=True, help="Chef Server URL")
    p.add_argument("--client", required=True, help="the client (or user) name to sign as")
    p.add_argument("--key", required=True, help="that client's private key (PEM file)")
    p.add_argument("--org", default=None, help="organization, for Chef Infra Server")
    p.add_argument(
        "--cookbook", action="append", default=[], help="import only these cookbooks; repeatable"
    )
    p.add_argument(
        "--all-versions",
        action="store_true",
        help="every version of each cookbook, not only the newest",
    )

    dep = sub.add_parser("deployments", help="deployments and their commands").add_subparsers(
        title="deployments commands"
    )
    p = command("list", cmd_list, "list a stack's deployments", dep)
    _client_args(p, "deployments", "stack")
    p = command("show", cmd_deployment_show, "show a deployment and its commands", dep)
    _client_args(p, "deployments", None)
    p.add_argument("ref", metavar="ID")
    p.add_argument(
        "--follow",
        action="store_true",
        help="stream each command's log until the deployment finishes",
    )
    p = command("create", cmd_deployment_create, "send a command to a stack's instances", dep)
    _client_args(p, "deployments", "stack")
    p.add_argument("command_name", metavar="COMMAND")
    p.add_argument("--app", help="app id or shortname (deploy, rollback, undeploy)")
    p.add_argument(
        "--instance",
        action="append",
        default=None,
        help="instance id or hostname; repeatable (default: every online one)",
    )
    p.add_argument("--recipe", action="append", default=[], help="for execute_recipes")
    p.add_argument("--custom-json", default="{}", help="JSON object for this deployment")
    p.add_argument("--comment", default="")
    p = command("log", cmd_command_log, "print a command's chef log", dep)
    _client_args(p, "commands", None)
    p.add_argument("ref", metavar="COMMAND_ID")
    return parser


def _client_args(
    p: argparse.ArgumentParser, resource: str, parent: str | None, with_stack: bool = False
) -> None:
    p.set_defaults(resource=resource)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--url", default=None, help="server URL (default $SCALARIUM_URL)")
    p.add_argument("--token", default=None, help="API token (default $SCALARIUM_TOKEN)")
    if parent == "stack":
        p.add_argument("--stack", required=True, help="stack id or shortname")


def _set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a field; VALUE is parsed as JSON when it can be; repeatable",
    )
    p.add_argument("--data", default=None, help="the whole request body as a JSON object")


# ---------------------------------------------------------------- server-side commands


def _settings() -> Any:
    return load_settings()


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective settings."""
    for key, value in describe(_settings()).items():
        print(f"{key:24} {value}")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create or upgrade the schema."""
    from server.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    print("database schema is up to date")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """Serve the API."""
    from server import processes

    settings = _settings()
    processes.ensure_redis(settings)
    token = processes.prepare(settings)
    if token:
        print(
            f"Admin token (shown once, also in {settings.data_dir / 'admin-token'}):\n  {token}",
            flush=True,
        )
    processes.run_server(settings)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker."""
    from server import processes

    settings = _settings()
    processes.ensure_redis(settings)
    processes.run_worker(settings, burst=args.burst)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    """Run the scheduler."""
    from server import processes

    settings = _settings()
    processes.ensure_redis(settings)
    processes.run_scheduler(settings)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Run everything."""
    from server import processes

    return processes.run_up(_settings())


def _database() -> Any:
    from server.db import Database
    from server.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    return Database(settings.database_url)


def cmd_tokens_create(args: argparse.Namespace) -> int:
    """Create a token."""
    from sqlalchemy import or_, select

    from server.access import create_token
    from server.models import Role, Stack

    roles: dict[str, Role] = {}
    database = _database()
    with database.session() as session:
        for spec in args.role:
            ref, _, role = spec.partition("=")
            if role not in {r.value for r in Role}:
                raise UsageError(f"--role {spec}: ROLE must be viewer, deployer or manager")
            stack = session.scalar(
                select(Stack).where(or_(Stack.id == ref, Stack.shortname == ref))
            )
            if stack is None:
                raise UsageError(f"--role {spec}: no stack {ref!r}")
            roles[stack.id] = Role(role)
        token, plaintext = create_token(session, args.name, admin=args.admin, roles=roles)
        token_id = token.id
    print(f"token {token_id} created; it is shown only now:\n{plaintext}")
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    """List tokens (never their values)."""
    from sqlalchemy import select

    from server.models import ApiToken

    with _database().session() as session:
        rows = [
            {
                "id": t.id,
                "name": t.name,
                "prefix": t.prefix + "…",
                "admin": t.is_admin,
                "roles": ",".join(f"{r.stack_id[:8]}={r.role}" for r in t.roles),
                "revoked": t.revoked_at.isoformat() if t.revoked_at else "",
            }
            for t in session.scalars(select(ApiToken).order_by(ApiToken.created_at))
        ]
    _print(rows, "tokens", args.json)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    """Revoke a token."""
    from server.db import utcnow
    from server.models import ApiToken

    with _database().session() as session:
        token = session.get(ApiToken, args.token_id)
        if token is None:
            raise UsageError(f"no token {args.token_id}")
        token.revoked_at = token.revoked_at or utcnow()
    print(f"token {args.token_id} revoked")
    return 0


# ---------------------------------------------------------------- API client commands


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("SCALARIUM_URL", "http://127.0.0.1:8080")
    token = args.token or os.environ.get("SCALARIUM_TOKEN", "")
    if not token:
        raise UsageError("no API token: set SCALARIUM_TOKEN or pass --token")
    return Client(url, token)


def _stack_id(client: Client, ref: str) -> str:
    """A stack id from an id or a shortname."""
    for stack in client.all("/stacks"):
        if ref in (stack["id"], stack["shortname"]):
            return str(stack["id"])
    raise ApiError(404, "stack_not_found", f"no stack {ref!r}")


def _child_id(client: Client, stack_id: str, resource: str, ref: str) -> str:
    """An id of a stack's layer, instance or app from its id or name."""
    name_field = RESOURCES[resource][0]
    for item in client.all(f"/stacks/{stack_id}/{resource}"):
        if ref in (item["id"], item[name_field]):
            return str(item["id"])
    raise ApiError(404, f"{resource[:-1]}_not_found", f"no {resource[:-1]} {ref!r} in the stack")


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.data:
        try:
            body = json.loads(args.data)
        except ValueError as exc:
            raise UsageError(f"--data is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise UsageError("--data must be a JSON object")
    for spec in args.set:
        key, sep, raw = spec.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {spec}: expected FIELD=VALUE")
        try:
            body[key] = json.loads(raw)
        except ValueError:
            body[key] = raw
    return body


def _path(client: Client, args: argparse.Namespace) -> str:
    """The item path for show/update/delete."""
    if args.resource == "stacks":
        return f"/stacks/{_stack_id(client, args.ref)}"
    return f"/{args.resource}/{args.ref}"


def cmd_list(args: argparse.Namespace) -> int:
    """List a resource."""
    client = _client(args)
    if args.resource == "stacks":
        items = client.all("/stacks")
    else:
        items = client.all(f"/stacks/{_stack_id(client, args.stack)}/{args.resource}")
    _print(items, args.resource, args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show one item."""
    client = _client(args)
    _print_one(client.get(_path(client, args)), args.json)
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    """Create an item."""
    client = _client(args)
    body = _body(args)
    body[RESOURCES[args.resource][0]] = args.name
    if args.resource == "stacks":
        path = "/stacks"
    else:
        stack_id = _stack_id(client, args.stack)
        path = f"/stacks/{stack_id}/{args.resource}"
        if args.resource == "instances" and args.layer:
            body["layer_ids"] = [_child_id(client, stack_id, "layers", x) for x in args.layer]
    _print_one(client.request("POST", path, body), args.json)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """Update an item."""
    client = _client(args)
    body = _body(args)
    if not body:
        raise UsageError("nothing to change: give --set FIELD=VALUE or --data JSON")
    _print_one(client.request("PATCH", _path(client, args), body), args.json)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete an item."""
    client = _client(args)
    result = client.request("DELETE", _path(client, args))
    print(json.dumps(result) if args.json else f"deleted {result['deleted']}")
    return 0


LIFECYCLE_ACTIONS = {
    "start": "start an instance (for a manual one, then run its user-data on the machine)",
    "stop": "stop an instance: shutdown recipes, then the provider stops the machine",
    "setup": "run setup again on an instance",
    "terminate": "terminate a stopped instance: the provider removes the machine",
}


def cmd_instance_action(args: argparse.Namespace) -> int:
    """Start, stop, set up again or terminate an instance."""
    client = _client(args)
    instance_id = _child_id(client, _stack_id(client, args.stack), "instances", args.ref)
    result = client.request("POST", f"/instances/{instance_id}/{args.action}", {})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"instance {result['hostname']}: {result['status']}")
    return 0


def cmd_update_cookbooks(args: argparse.Namespace) -> int:
    """Ask the server to rebuild the stack's bundle and update its online instances."""
    client = _client(args)
    result = client.request("POST", f"{_path(client, args)}/update-cookbooks", {})
    print(
        json.dumps(result, indent=2)
        if args.json
        else f"update-cookbooks: {result['status']} (job {result.get('job_id', '-')})"
    )
    return 0


def cmd_chef_import(args: argparse.Namespace) -> int:
    """Copy roles, environments, data bags and cookbooks from a Chef Server into a directory."""
    from pathlib import Path

    from chef_bridge.auth import AuthError
    from chef_bridge.chef_import import ChefImportError, import_from_server
    from chef_bridge.chef_server import ChefServerClient, ChefServerError

    try:
        key = Path(args.key).read_bytes()
    except OSError as exc:
        raise UsageError(f"--key {args.key}: {exc.strerror}") from exc
    try:
        client = ChefServerClient(args.server, args.client, key, organization=args.org or None)
        summary = import_from_server(
            client,
            Path(args.dest),
            cookbooks=args.cookbook or None,
            latest_only=not args.all_versions,
            progress=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except (ChefServerError, ChefImportError, AuthError) as exc:
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def cmd_user_data(args: argparse.Namespace) -> int:
    """Print an instance's user-data script (or, with --json, the whole answer)."""
    client = _client(args)
    instance_id = _child_id(client, _stack_id(client, args.stack), "instances", args.ref)
    result = client.get(f"/instances/{instance_id}/user-data")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["user_data"], end="")
        print(
            f"# token valid until {result['expires_at']}; instance is {result['status']}",
            file=sys.stderr,
        )
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    """Clone a stack."""
    client = _client(args)
    body = {"shortname": args.shortname}
    if args.name:
        body["name"] = args.name
    _print_one(client.request("POST", f"{_path(client, args)}/clone", body), args.json)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """Print a stack's events."""
    client = _client(args)
    page = client.get(f"{_path(client, args)}/events", limit=args.limit)
    if args.json:
        print(json.dumps(page["items"], indent=2))
        return 0
    for event in page["items"]:
        print(f"{event['created_at']}  {event['kind']:22} {event['message']}")
    return 0


def cmd_deployment_create(args: argparse.Namespace) -> int:
    """Create a deployment."""
    client = _client(args)
    stack_id = _stack_id(client, args.stack)
    try:
        custom_json = json.loads(args.custom_json)
    except ValueError as exc:
        raise UsageError(f"--custom-json is not valid JSON: {exc}") from exc
    body: dict[str, Any] = {
        "command": args.command_name,
        "custom_json": custom_json,
        "comment": args.comment,
        "recipes": args.recipe,
    }
    if args.app:
        body["app_id"] = _child_id(client, stack_id, "apps", args.app)
    if args.instance is not None:
        body["instance_ids"] = [_child_id(client, stack_id, "instances", x) for x in args.instance]
    result = client.request("POST", f"/stacks/{stack_id}/deployments", body)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"deployment {result['id']}: {result['command']} sent to "
            f"{len(result['commands'])} instance(s)"
        )
    return 0


def cmd_deployment_show(args: argparse.Namespace) -> int:
    """Show a deployment; with --follow, stream its commands' logs until it finishes."""
    client = _client(args)
    deployment = client.get(f"/deployments/{args.ref}")
    if not args.follow:
        if args.json:
            print(json.dumps(deployment, indent=2))
        else:
            _print_one({k: v for k, v in deployment.items() if k != "commands"}, False)
            print()
            _print(deployment["commands"], "commands", False)
        return 0
    offsets: dict[str, int] = {}
    while True:
        for command in deployment["commands"]:
            chunk = client.get(
                f"/commands/{command['id']}/log", offset=offsets.get(command["id"], 0)
            )
            offsets[command["id"]] = chunk["next_offset"]
            for line in chunk["log"].splitlines():
                print(f"[{command['instance_id'][:8]}] {line}", flush=True)
        if deployment["status"] != "running":
            print(f"deployment {deployment['id']}: {deployment['status']}")
            return 0 if deployment["status"] == "successful" else 1
        time.sleep(1)
        deployment = client.get(f"/deployments/{args.ref}")


def cmd_command_log(args: argparse.Namespace) -> int:
    """Print a command's log."""
    client = _client(args)
    print(client.get(f"/commands/{args.ref}/log")["log"], end="")
    return 0


# ---------------------------------------------------------------- output


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if value is None:
        return "-"
    return str(value)


def _print(items: list[dict[str, Any]], resource: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(items, indent=2))
        return
    columns = COLUMNS[resource]
    rows = [[_cell(item.get(c)) for c in columns] for item in items]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _print_one(item: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(item, indent=2))
        return
    width = max(len(k) for k in item) if item else 0
    for key, value in item.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else _cell(value)
        print(f"{key.ljust(width)}  {shown}")


if __name__ == "__main__":
    sys.exit(main())
