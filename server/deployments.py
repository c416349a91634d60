"""Pure decisions about deployments: which instances a command goes to, and its overall state."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.models import CommandStatus, CommandType, DeploymentStatus, InstanceState

APP_COMMANDS = frozenset({CommandType.DEPLOY, CommandType.ROLLBACK, CommandType.UNDEPLOY})


@dataclass(frozen=True)
class Target:
    """An instance as targeting sees it."""

    id: str
    status: str
    layer_ids: frozenset[str]


class TargetError(ValueError):
    """The request names instances a deployment cannot go to."""

    def __init__(self, code: str, message: str, ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.ids = list(ids)


def select_targets(
    command: CommandType,
    instances: Iterable[Target],
    *,
    app_layer_ids: frozenset[str] | None = None,
    requested: Sequence[str] | None = None,
) -> list[str]:
    """The ids a deployment's commands go to: online instances, narrowed by app and request."""
    by_id = {i.id: i for i in instances}
    if requested is not None:
        unknown = [i for i in requested if i not in by_id]
        if unknown:
            raise TargetError("instance_not_in_stack", "instances not in this stack", unknown)
        offline = [i for i in requested if by_id[i].status != InstanceState.ONLINE]
        if offline:
            raise TargetError("instance_not_online", "instances are not online", offline)
        chosen = [by_id[i] for i in dict.fromkeys(requested)]
    else:
        chosen = [i for i in by_id.values() if i.status == InstanceState.ONLINE]
    if command in APP_COMMANDS and app_layer_ids:
        outside = [i.id for i in chosen if not i.layer_ids & app_layer_ids]
        if requested is not None and outside:
            raise TargetError(
                "instance_not_in_app_layers", "instances are not in the app's layers", outside
            )
        chosen = [i for i in chosen if i.layer_ids & app_layer_ids]
    if not chosen:
        raise TargetError("no_online_instances", "no online instance to run this on")
    return sorted(i.id for i in chosen)


def aggregate_status(states: Iterable[str]) -> DeploymentStatus:
    """Running while any command is unfinished; failed if any failed or timed out."""
    states = list(states)
    if any(s in (CommandStatus.QUEUED, CommandStatus.RUNNING) for s in states):
        return DeploymentStatus.RUNNING
    if any(s in (CommandStatus.FAILED, CommandStatus.TIMED_OUT) for s in states):
        return DeploymentStatus.FAILED
    return DeploymentStatus.SUCCESSFUL
