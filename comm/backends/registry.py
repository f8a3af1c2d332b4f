"""Dispatch/combine backends by name: what each one can do (``Capabilities``) and where its class is.

    @register_backend("deepep-ll", Capabilities(fixed_capacity=True, host_sync_free=True, devices=("cuda",)))
    class DeepEPLowLatency(DispatchBackend): ...            # a third-party backend: register the class

    backend_names() -> ("ll", "sync", "tbo", "wave", ...)   # every registered name, sorted
    backend_capabilities("ll") -> Capabilities               # read without importing the backend's module
    get_backend("ll") -> the DispatchBackend subclass        # imports a lazily registered class on first use
    unregister_backend("deepep-ll")

A backend is registered either with its class (the decorator) or lazily with ``target="module:Class"`` and its
capabilities (how comm/backends/__init__.py registers the built-in ones), so names and capabilities can be read
without importing torch or the backend's own dependencies (topology validation and the planner read them). An
unknown name raises ``UnknownBackendError`` (a ValueError) naming the registered ones. This module imports
neither torch nor any backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comm.backends.base import DispatchBackend

# How a backend hides communication behind compute inside one MoE layer call (the planner's overlap model):
#   none          the routed experts wait for all tokens, the combine for all experts (the shared expert may run
#                 while the tokens travel);
#   micro_batches two micro-batches: one's tokens or results travel while the other computes;
#   expert_waves  the local expert slots in waves: a wave's tokens travel while the previous wave computes.
OVERLAPS = ("none", "micro_batches", "expert_waves")
DEVICE_TYPES = ("cpu", "cuda")


class UnknownBackendError(ValueError):
    """No dispatch backend is registered under the name asked for."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; declared when it is registered.

    overlap: one of OVERLAPS. fixed_capacity: every rank sends a fixed number of rows to every destination
    (no count exchange). host_sync_free: dispatch and combine never read device data on the host (no
    ``.item()``, ``.tolist()``, nonzero, data-dependent shapes), so they can run in a CUDA graph. devices: the
    tensor device types it runs on. options: the keyword options its constructor takes (``Dispatcher`` passes a
    backend only its own options and rejects an option no registered backend takes).
    """

    overlap: str = "none"
    fixed_capacity: bool = False
    host_sync_free: bool = False
    devices: tuple[str, ...] = DEVICE_TYPES
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.overlap not in OVERLAPS:
            raise ValueError(f"capabilities overlap {self.overlap!r}: must be one of {OVERLAPS}")
        bad = [d for d in self.devices if d not in DEVICE_TYPES]
        if not self.devices or bad:
            raise ValueError(f"capabilities devices {self.devices!r}: need one or more of {DEVICE_TYPES}")
        if any(not isinstance(o, str) or not o.isidentifier() for o in self.options):
            raise ValueError(f"capabilities options {self.options!r}: must be keyword names")


@dataclass
class _Entry:
    capabilities: Capabilities
    target: str | None  # "module:Class", imported on first get_backend
    cls: type | None


_REGISTRY: dict[str, _Entry] = {}


def register_backend(name: str, capabilities: Capabilities | None = None, *,
                     target: str | None = None) -> Callable[[type], type]:
    """Register a backend under ``name``.

    As a class decorator: ``@register_backend(name, capabilities)`` on a ``DispatchBackend`` subclass. Lazily:
    ``register_backend(name, capabilities, target="package.module:ClassName")`` (the class is imported by the
    first ``get_backend(name)``). A name can be registered once (``unregister_backend`` frees it).
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"backend name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"EP backend {name!r} is already registered")
    caps = capabilities if capabilities is not None else Capabilities()
    if not isinstance(caps, Capabilities):
        raise TypeError(f"capabilities must be a Capabilities, got {type(caps).__name__}")
    if target is not None:
        if target.count(":") != 1:
            raise ValueError(f"backend target {target!r}: expected 'package.module:ClassName'")
        _REGISTRY[name] = _Entry(caps, target, None)
        return lambda cls: cls

    def decorate(cls: type) -> type:
        _REGISTRY[name] = _Entry(caps, None, _checked(name, cls))
        return cls

    return decorate


def unregister_backend(name: str) -> None:
    """Remove ``name`` from the registry (a plugin that goes away, or a test's toy backend)."""
    _entry(name)
    del _REGISTRY[name]


def backend_names() -> tuple[str, ...]:
    """Every registered backend name, sorted."""
    return tuple(sorted(_REGISTRY))


def backend_capabilities(name: str) -> Capabilities:
    """The capabilities ``name`` was registered with (imports nothing)."""
    return _entry(name).capabilities


def backend_options() -> frozenset[str]:
    """Every keyword option some registered backend takes."""
    return frozenset(o for e in _REGISTRY.values() for o in e.capabilities.options)


def get_backend(name: str) -> type[DispatchBackend]:
    """The backend class registered as ``name`` (a lazy registration is imported here, once)."""
    entry = _entry(name)
    if entry.cls is None:
        module, _, attr = entry.target.partition(":")
        cls = getattr(importlib.import_module(module), attr, None)
        if cls is None:
            raise ImportError(f"EP backend {name!r}: {module} has no {attr!r}")
        entry.cls = _checked(name, cls)
    return entry.cls


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(f"EP backend {name!r}: must be one of {backend_names()}") from None


def _checked(name: str, cls: type) -> type:
    from comm.backends.base import DispatchBackend  # a backend class exists, so torch is loaded already

    if not (isinstance(cls, type) and issubclass(cls, DispatchBackend)):
        raise TypeError(f"EP backend {name!r}: {cls!r} is not a comm.backends.base.DispatchBackend subclass")
    return cls
