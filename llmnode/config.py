"""The node's configuration: YAML in, frozen value objects out.

Every problem in a file is reported at once, each with the YAML path of the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

#: The endpoints each model mode serves (DESIGN.md).
MODES = {
    "Chat": frozenset({"chat", "completions"}),
    "Base": frozenset({"completions"}),
    "Embedding": frozenset({"embeddings"}),
    "Reranker": frozenset({"rerank"}),
}


def _frozen(mapping=None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Plan:
    """One hardware plan of a model: what it needs and how to start it.

    @ivar memory_mb: device name (as written in required_devices) -> MB.
    """

    name: str
    required_devices: tuple[str, ...]
    script_path: str
    memory_mb: Mapping[str, float] = field(default_factory=_frozen)
    env: Mapping[str, str] = field(default_factory=_frozen)
    stop_command: Optional[str] = None


@dataclass(frozen=True)
class Model:
    """One model the node can serve. Times are in seconds except alive_time (minutes)."""

    id: str
    mode: str
    port: int
    plans: tuple[Plan, ...]
    aliases: tuple[str, ...] = ()
    auto_start: bool = False
    alive_time: Optional[float] = None
    start_timeout: float = 300.0
    health_path: Optional[str] = None
    upstream_model: Optional[str] = None
    stop_timeout: float = 10.0
    max_concurrency: Optional[int] = None
    max_queue: int = 100

    @property
    def names(self) -> tuple[str, ...]:
        """The id followed by every alias."""
        return (self.id,) + self.aliases

    def serves(self, endpoint: str) -> bool:
        """Whether this model's mode serves C{endpoint} (a key of L{MODES}' sets)."""
        return endpoint in MODES.get(self.mode, ())


@dataclass(frozen=True)
class Program:
    """Node-wide settings (the C{program} section). Paths are absolute once loaded."""

    host: str = "0.0.0.0"
    port: int = 8080
    log_level: str = "INFO"
    alive_time: float = 30.0
    device_plugin_dir: Optional[str] = None
    log_dir: str = "logs"
    runtime_dir: Optional[str] = None
    max_body_mb: float = 64.0
    health_interval: float = 0.05
    stream_idle_timeout: float = 300.0
    backend_header_timeout: float = 600.0
    placement_wait: float = 60.0


@dataclass(frozen=True)
class Config:
    """A loaded configuration file.

    @ivar base_dir: the folder of the config file; scripts run there.
    @ivar warnings: non-fatal findings (unknown keys, with suggestions).
    """

    program: Program
    models: tuple[Model, ...]
    path: Optional[str] = None
    base_dir: str = "."
    warnings: tuple[str, ...] = ()

    def resolve(self, name: str) -> Optional[Model]:
        """The model whose id or alias is C{name} (case-sensitive), or None."""
        for model in self.models:
            if name in model.names:
                return model
        return None
