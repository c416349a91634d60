"""The data model: the database is the only source of truth (DESIGN.md)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from server.db import Base, UTCDateTime, new_id, utcnow


class LifecycleEvent(enum.StrEnum):
    """The five lifecycle events recipes are bound to."""

    SETUP = "setup"
    CONFIGURE = "configure"
    DEPLOY = "deploy"
    UNDEPLOY = "undeploy"
    SHUTDOWN = "shutdown"


class InstanceState(enum.StrEnum):
    """Instance states, as in DESIGN.md."""

    REQUESTED = "requested"
    PENDING = "pending"
    BOOTING = "booting"
    RUNNING_SETUP = "running_setup"
    ONLINE = "online"
    SETUP_FAILED = "setup_failed"
    START_FAILED = "start_failed"
    CONNECTION_LOST = "connection_lost"
    STOPPING = "stopping"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


# States in which a stack may be deleted without losing track of a running server.
QUIESCENT_STATES = frozenset(
    {InstanceState.REQUESTED, InstanceState.STOPPED, InstanceState.TERMINATED}
)


class Provider(enum.StrEnum):
    """Who provides an instance's machine."""

    EC2 = "ec2"
    MANUAL = "manual"
    LOCAL = "local"


class ScalingType(enum.StrEnum):
    """How an instance is started and stopped."""

    ALWAYS = "24/7"
    TIME = "time"
    LOAD = "load"


class CommandType(enum.StrEnum):
    """What a deployment asks instances to do."""

    SETUP = "setup"
    CONFIGURE = "configure"
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    UNDEPLOY = "undeploy"
    EXECUTE_RECIPES = "execute_recipes"
    UPDATE_CUSTOM_COOKBOOKS = "update_custom_cookbooks"
    SHUTDOWN = "shutdown"


class CommandStatus(enum.StrEnum):
    """One command's state on one instance."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCESSFUL = "successful"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    TIMED_OUT = "timed_out"


FINISHED_COMMAND_STATES = frozenset(
    {
        CommandStatus.SUCCESSFUL,
        CommandStatus.FAILED,
        CommandStatus.SUPERSEDED,
        CommandStatus.TIMED_OUT,
    }
)


class DeploymentStatus(enum.StrEnum):
    """A deployment's state, aggregated from its commands."""

    RUNNING = "running"
    SUCCESSFUL = "successful"
    FAILED = "failed"


class Role(enum.StrEnum):
    """Per-stack roles, lowest first."""

    VIEWER = "viewer"
    DEPLOYER = "deployer"
    MANAGER = "manager"


ROLE_RANK = {Role.VIEWER: 1, Role.DEPLOYER: 2, Role.MANAGER: 3}


def _enum_column(kind: type[enum.StrEnum], length: int = 32) -> String:
    # Enums are stored as plain strings so adding a state needs no ALTER TYPE on PostgreSQL.
    return String(length)


instance_layers = Table(
    "instance_layers",
    Base.metadata,
    Column("instance_id", ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("layer_id", ForeignKey("layers.id", ondelete="CASCADE"), primary_key=True),
)


class Stack(Base):
    """A cluster: one environment such as production or staging."""

    __tablename__ = "stacks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    shortname: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    region: Mapped[str] = mapped_column(String(32), default="us-east-1")
    default_os: Mapped[str] = mapped_column(String(64), default="ubuntu-22.04")
    default_instance_type: Mapped[str] = mapped_column(String(32), default="t3.small")
    default_availability_zone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    default_ssh_key_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    chef_version: Mapped[str] = mapped_column(String(32), default="18")
    chef_binary: Mapped[str] = mapped_column(String(32), default="cinc-solo")
    use_custom_cookbooks: Mapped[bool] = mapped_column(Boolean, default=False)
    custom_cookbooks_source: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    custom_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cluster_version: Mapped[int] = mapped_column(Integer, default=0)
    # The cluster version the last configure fan-out planned for; behind means a fan-out is due.
    fanout_version: Mapped[int] = mapped_column(Integer, default=0)
    # The cookbook bundle commands of this stack use (content address), when one was built.
    bundle_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bundle_built_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    layers: Mapped[list[Layer]] = relationship(
        back_populates="stack", cascade="all, delete-orphan", order_by="Layer.created_at"
    )
    instances: Mapped[list[Instance]] = relationship(
        back_populates="stack", cascade="all, delete-orphan"
    )
    apps: Mapped[list[App]] = relationship(back_populates="stack", cascade="all, delete-orphan")


class Layer(Base):
    """A role in a stack, with recipes per lifecycle event."""

    __tablename__ = "layers"
    __table_args__ = (UniqueConstraint("stack_id", "shortname"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    stack_id: Mapped[str] = mapped_column(ForeignKey("stacks.id", ondelete="CASCADE"), index=True)
    shortname: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32), default="custom")
    recipes: Mapped[dict[str, list[str]]] = mapped_column(JSON, default=dict)
    custom_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    packages: Mapped[list[str]] = mapped_column(JSON, default=list)
    auto_healing: Mapped[bool] = mapped_column(Boolean, default=True)
    scaling: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    stack: Mapped[Stack] = relationship(back_populates="layers")
    instances: Mapped[list[Instance]] = relationship(
        secondary=instance_layers, back_populates="layers"
    )


class Instance(Base):
    """One server of a stack, in one or more layers."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("stack_id", "hostname"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    stack_id: Mapped[str] = mapped_column(ForeignKey("stacks.id", ondelete="CASCADE"), index=True)
    hostname: Mapped[str] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(
        _enum_column(InstanceState), default=InstanceState.REQUESTED.value, index=True
    )
    provider: Mapped[str] = mapped_column(_enum_column(Provider), default=Provider.MANUAL.value)
    scaling_type: Mapped[str] = mapped_column(
        _enum_column(ScalingType), default=ScalingType.ALWAYS.value
    )
    instance_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    os: Mapped[str | None] = mapped_column(String(64), nullable=True)
    architecture: Mapped[str | None] = mapped_column(String(16), nullable=True)
    availability_zone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ami_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ec2_instance_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    private_ip: Mapped[str | None] = mapped_column(String(45), nullable=True)
    public_ip: Mapped[str | None] = mapped_column(String(45), nullable=True)
    private_dns_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    public_dns_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    agent_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    stack: Mapped[Stack] = relationship(back_populates="instances")
    layers: Mapped[list[Layer]] = relationship(
        secondary=instance_layers, back_populates="instances", order_by="Layer.created_at"
    )


class App(Base):
    """Code deployed to a stack's app layers."""

    __tablename__ = "apps"
    __table_args__ = (UniqueConstraint("stack_id", "shortname"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    stack_id: Mapped[str] = mapped_column(ForeignKey("stacks.id", ondelete="CASCADE"), index=True)
    shortname: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32), default="other")
    source: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    domains: Mapped[list[str]] = mapped_column(JSON, default=list)
    # {NAME: {"value": <ciphertext when secure, else plain>, "secure": bool}}
    environment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    layer_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enable_ssl: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    stack: Mapped[Stack] = relationship(back_populates="apps")


class Deployment(Base):
    """One operator (or automatic) action on a stack, sent to a set of instances."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    stack_id: Mapped[str] = mapped_column(ForeignKey("stacks.id", ondelete="CASCADE"), index=True)
    app_id: Mapped[str | None] = mapped_column(
        ForeignKey("apps.id", ondelete="SET NULL"), nullable=True
    )
    command: Mapped[str] = mapped_column(_enum_column(CommandType))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    custom_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    comment: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(
        _enum_column(DeploymentStatus), default=DeploymentStatus.RUNNING.value
    )
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    commands: Mapped[list[Command]] = relationship(
        back_populates="deployment", order_by="Command.created_at"
    )


class Command(Base):
    """One deployment's work on one instance, with its chef log."""

    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_instance_status", "instance_id", "status"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    deployment_id: Mapped[str | None] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), nullable=True, index=True
    )
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(_enum_column(CommandType))
    status: Mapped[str] = mapped_column(
        _enum_column(CommandStatus), default=CommandStatus.QUEUED.value
    )
    cluster_version: Mapped[int] = mapped_column(Integer, default=0)
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration: Mapped[float | None] = mapped_column(Float, nullable=True)
    log: Mapped[str] = mapped_column(Text, default="")
    log_bytes: Mapped[int] = mapped_column(Integer, default=0)
    log_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    deployment: Mapped[Deployment | None] = relationship(back_populates="commands")


class Event(Base):
    """The audit trail: every change and every lifecycle step."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stack_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    instance_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class ApiToken(Base):
    """A bearer token, stored as its SHA-256 hash."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    roles: Mapped[list[TokenRole]] = relationship(
        back_populates="token", cascade="all, delete-orphan"
    )


class TokenRole(Base):
    """A token's role on one stack."""

    __tablename__ = "token_roles"

    token_id: Mapped[str] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), primary_key=True
    )
    stack_id: Mapped[str] = mapped_column(
        ForeignKey("stacks.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(_enum_column(Role))

    token: Mapped[ApiToken] = relationship(back_populates="roles")


class EnrollmentToken(Base):
    """A one-time enrollment token for one instance, stored as its SHA-256 hash."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    instance_id: Mapped[str] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set when newer user-data replaced this token, so the node hears why it was refused.
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class InstanceCertificate(Base):
    """A certificate the CA issued to an instance; the newest unrevoked one authenticates it."""

    __tablename__ = "instance_certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)
    instance_id: Mapped[str] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    pem: Mapped[str] = mapped_column(Text)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
