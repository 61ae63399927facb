"""The layer registry: pluggy plugin manager, entry-point loading, validation.

Installed plugins are found through the entry-point group ``nnrt`` and loaded
on first use, each in its own try/except: one that fails to import (or
whose hook fails) is reported with a ``PluginWarning`` naming it, and the
others keep working. ``register_plugin`` adds a plugin at run time and raises
instead of warning.

Load order (so that nothing depends on install or file-system order): the
core's ``dense``, then nnrt's own entry points (``nnrt_plugins``), then every
third-party entry point sorted by distribution name and entry-point name.
A name is never displaced: an installed plugin that registers a layer name
some plugin already holds is refused that name (a ``PluginWarning`` names both)
and keeps the layers it could register; one whose every layer was refused is
removed from the plugin manager altogether.
"""

from __future__ import annotations

import importlib.metadata as ilm
import inspect
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from nnrt import hookspecs
from nnrt._text import escape_controls
from nnrt.layer import Layer
from nnrt.warnings import skip_frames_of, warn_user

__all__ = [
    "PluginError",
    "PluginWarning",
    "PluginInfo",
    "LayerEntry",
    "LossEntry",
    "OptimizerEntry",
    "Registry",
    "registry",
]

ENTRY_POINT_GROUP = "nnrt"
DISABLE_ENV = "NNRT_DISABLE_PLUGINS"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_REQUIRED_OVERRIDES = ("forward", "backward")
_REQUIRED_MEMBERS = ("forward", "backward", "params", "grads", "buffers", "config")


class PluginWarning(UserWarning):
    """An installed plugin could not be loaded; the message names it and why."""


class PluginError(Exception):
    """A plugin broke the hook contract (bad hook signature, return value, class)."""


@dataclass
class LayerEntry:
    """One registered layer type."""

    name: str
    cls: type[Layer]
    plugin: str
    dist: str | None = None


@dataclass
class LossEntry:
    """One registered loss function."""

    name: str
    fn: Callable[..., Any]
    plugin: str
    dist: str | None = None


@dataclass
class OptimizerEntry:
    """One registered optimizer class."""

    name: str
    cls: type[Any]
    plugin: str
    dist: str | None = None


@dataclass
class Refusal:
    """A name an installed plugin offered but another plugin already held."""

    kind: str  # "layer", "loss" or "optimizer"
    name: str
    holder: str  # the plugin that holds the name
    where: str  # module.qualname of what the holder registered


@dataclass
class PluginInfo:
    """What `nnrt plugins` shows for one plugin."""

    name: str
    status: str  # "ok", "failed: <reason>", "disabled"
    source: str  # "entry point <value>" or "registered at run time"
    dist: str | None = None
    version: str | None = None
    layers: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    optimizers: list[str] = field(default_factory=list)


def _plugin_default_name(pm: pluggy.PluginManager, plugin: object) -> str:
    """A module's ``__name__``, else pluggy's canonical name (``__name__`` or ``id``)."""
    return str(pm.get_canonical_name(plugin))


def _canonical_dist(name: str | None) -> str:
    """PEP 503 normalisation: ``My_Plugin`` and ``my-plugin`` sort as one."""
    return re.sub(r"[-_.]+", "-", name or "").lower()


@dataclass(frozen=True)
class _EntryPoint:
    ep: Any  # importlib.metadata.EntryPoint
    dist: str | None
    version: str | None
    builtin: bool


def _is_builtin(ep: Any, dist: str | None) -> bool:
    """nnrt's own entry points (the ``nnrt_plugins`` package of the ``nnrt`` distribution)."""
    module = str(ep.value).split(":", 1)[0].strip()
    if module.split(".", 1)[0] != "nnrt_plugins":
        return False
    return dist is None or _canonical_dist(dist) == "nnrt"


def _sorted_entry_points(eps: Any) -> list[_EntryPoint]:
    """Built-ins first (in their declared order), then third parties sorted by
    (distribution, entry-point name, value); the same entry point twice is read once."""
    rows: list[_EntryPoint] = []
    seen: set[tuple[str, str, str]] = set()
    for ep in eps:
        dist = getattr(ep, "dist", None)
        try:
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
        except Exception:  # a broken METADATA file: still load the plugin, unnamed
            dist_name = version = None
        key = (_canonical_dist(dist_name), str(ep.name), str(ep.value))
        if key in seen:
            continue
        seen.add(key)
        rows.append(_EntryPoint(ep, dist_name, version, _is_builtin(ep, dist_name)))
    builtins = [r for r in rows if r.builtin]
    others = sorted(
        (r for r in rows if not r.builtin),
        key=lambda r: (_canonical_dist(r.dist), str(r.ep.name), str(r.ep.value)),
    )
    return builtins + others


def _defines(cls: type, member: str) -> bool:
    """True if a class between ``cls`` and Layer (exclusive) defines ``member``."""
    for klass in cls.__mro__:
        if klass is Layer:
            return False
        if member in vars(klass):
            return True
    return False


def _check_name(pname: str, kind: str, name: object) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"nnrt plugin {pname!r}: {kind} name must be a non-empty identifier-like "
            f"string (letters, digits, '_', '-', '.'), got {name!r}"
        )


def _validate_loss(pname: str, name: object, fn: object) -> None:
    _check_name(pname, "loss", name)
    if not callable(fn) or not _takes_positional(fn, 2):
        raise TypeError(
            f"nnrt plugin {pname!r}: loss {name!r} must be a function "
            f"fn(Y, target) -> (loss, dY), got {type(fn).__name__} {fn!r:.80}"
        )


def _validate_optimizer(pname: str, name: object, cls: object) -> None:
    _check_name(pname, "optimizer", name)
    if not isinstance(cls, type):
        raise TypeError(
            f"nnrt plugin {pname!r}: register({name!r}, cls) needs an optimizer "
            f"class, got {type(cls).__name__} {cls!r:.80}"
        )
    missing = [m for m in ("step", "zero_grad") if not callable(getattr(cls, m, None))]
    if missing or not _takes_positional(cls, 1, partial=True):
        need = f"lacks {', '.join(missing)}" if missing else "cannot be called as cls(net)"
        raise TypeError(
            f"nnrt plugin {pname!r}: optimizer {name!r} class {cls.__qualname__} "
            f"{need}; an optimizer is built as cls(net, **kwargs) and has step() "
            f"and zero_grad()"
        )


def _takes_positional(fn: Callable[..., Any], n: int, partial: bool = False) -> bool:
    """False when ``fn``'s signature is known and cannot take ``n`` positional arguments
    (followed by keywords, for ``partial``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, extension types: cannot tell
        return True
    try:
        if partial:
            sig.bind_partial(*range(n))
        else:
            sig.bind(*range(n))
    except TypeError:
        return False
    return True


class Registry:
    """Holds the plugin manager and the name → layer class table."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._layers: dict[str, LayerEntry] = {}
        self._losses: dict[str, LossEntry] = {}
        self._optimizers: dict[str, OptimizerEntry] = {}
        self._plugins: dict[str, PluginInfo] = {}
        self._refused: list[PluginInfo] = []  # entry points whose plugin name was taken
        self._loaded = False
        self._loading = False
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- loading
    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            # NOTE: _loaded is set only once everything is loaded, so that another
            # thread waits on the lock instead of seeing a half-filled registry;
            # _loading lets the loading thread itself (a plugin that uses nnrt while
            # it is imported) through
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                from nnrt import _core_plugin

                info = PluginInfo(name="nnrt", status="ok", source="nnrt core")
                self._plugins["nnrt"] = info
                self._register(_core_plugin, "nnrt", "nnrt", info)
                self._load_entry_points()
            finally:
                self._loaded = True
                self._loading = False

    def _load_entry_points(self) -> None:
        disabled = {s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()}
        for row in _sorted_entry_points(ilm.entry_points(group=ENTRY_POINT_GROUP)):
            ep, dist_name, version = row.ep, row.dist, row.version
            where = escape_controls(f" (from {dist_name} {version})") if dist_name else ""
            info = PluginInfo(
                name=ep.name,
                status="ok",
                source=f"entry point {ep.value}",
                dist=dist_name,
                version=version,
            )
            holder = self._plugins.get(ep.name)
            if holder is not None:
                # another distribution already has a plugin of this name (built-ins
                # and earlier-sorted third parties win); not registered, not listed
                held = f" ({holder.dist} {holder.version})" if holder.dist else ""
                info.status = f"refused: plugin name {ep.name!r} taken by {holder.source}{held}"
                self._refused.append(info)
                warn_user(
                    f"nnrt plugin {ep.name!r}{where}, entry point {ep.value}, was refused: "
                    f"the plugin name {ep.name!r} is already taken by {holder.source}{held}",
                    PluginWarning,
                )
                continue
            self._plugins[ep.name] = info
            if ep.name in disabled:
                info.status = f"disabled ({DISABLE_ENV})"
                continue
            try:
                plugin = ep.load()
                refused = self._register(plugin, ep.name, dist_name, info, refuse_clashes=True)
                if self.pm.get_plugin(ep.name) is plugin:
                    skip_frames_of(plugin)
            except Exception as exc:
                # the reason is third-party text: one line, control characters escaped
                reason = escape_controls(f"{type(exc).__name__}: {exc}")
                info.status = f"failed: {reason}"
                warn_user(
                    f"nnrt plugin {ep.name!r}{where} failed to load and was skipped: {reason}",
                    PluginWarning,
                )
                continue
            serves = [*info.layers, *info.losses, *info.optimizers]
            for r in refused:
                warn_user(
                    f"nnrt plugin {ep.name!r}{where} registers {r.kind} name {r.name!r}, which "
                    f"plugin {r.holder!r} already registered ({r.where}); "
                    f"{ep.name!r} was refused that name and still serves "
                    f"{', '.join(repr(n) for n in serves) or 'nothing'}",
                    PluginWarning,
                )

    # ------------------------------------------------------------ registration
    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        """Register ``plugin`` (a module or object with hookimpls) now; return its name.

        Raises PluginError/TypeError/ValueError naming the plugin if it breaks
        the contract; nothing of a failed plugin stays registered.
        """
        self.ensure_loaded()
        with self._lock:
            if self.pm.is_registered(plugin):
                existing = self.pm.get_name(plugin)
                assert existing is not None
                return existing
            if name is not None and (not isinstance(name, str) or not name):
                raise TypeError(f"register_plugin: name must be a non-empty str, got {name!r}")
            pname = name if name is not None else _plugin_default_name(self.pm, plugin)
            held = self._plugins.get(pname)
            # a failed, disabled or refused entry point holds its name only as a record
            if held is not None and (held.status == "ok" or self.pm.get_plugin(pname) is not None):
                raise ValueError(
                    f"an nnrt plugin named {pname!r} is already registered "
                    f"({held.source}); pass register_plugin(..., name=...)"
                )
            info = PluginInfo(name=pname, status="ok", source="registered at run time")
            self._register(plugin, pname, None, info)
            self._plugins[pname] = info
            return pname

    def _register(
        self,
        plugin: object,
        pname: str,
        dist: str | None,
        info: PluginInfo,
        refuse_clashes: bool = False,
    ) -> list[Refusal]:
        """Register ``plugin`` with pluggy and its layers in the table, or nothing at all.

        With ``refuse_clashes`` (installed plugins) a layer name that is already
        taken is left out and returned as ``(name, holder)``; otherwise it raises.
        """
        if self.pm.get_plugin(pname) is not None:
            raise ValueError(f"an nnrt plugin named {pname!r} is already registered")
        try:
            self.pm.register(plugin, name=pname)
        except pluggy.PluginValidationError as exc:
            self._forget(plugin, pname)  # pluggy < 1.7 leaves a rejected plugin half-registered
            raise PluginError(f"nnrt plugin {pname!r} has an invalid hook: {exc}") from exc
        except BaseException:
            self._forget(plugin, pname)
            raise
        refused: list[Refusal] = []
        try:
            self._check_hooknames(plugin, pname)
            sink = refused if refuse_clashes else None
            staged = self._collect_layers(plugin, pname, dist, sink)
            staged_losses = self._collect_losses(plugin, pname, dist, sink)
            staged_optimizers = self._collect_optimizers(plugin, pname, dist, sink)
        except BaseException:
            self._forget(plugin, pname)
            raise
        if refused and not (staged or staged_losses or staged_optimizers):
            # everything it offers belongs to other plugins: its other hooks
            # (network checks, export) would act on layers it does not own
            self._forget(plugin, pname)
            info.status = "refused: " + ", ".join(
                f"{r.kind} {r.name!r} belongs to plugin {r.holder!r}" for r in refused
            )
        elif refused:
            info.status = "ok; refused: " + ", ".join(
                f"{r.kind} {r.name!r} (belongs to plugin {r.holder!r})" for r in refused
            )
        self._layers.update(staged)
        self._losses.update(staged_losses)
        self._optimizers.update(staged_optimizers)
        info.layers = sorted(staged)
        info.losses = sorted(staged_losses)
        info.optimizers = sorted(staged_optimizers)
        return refused

    def _forget(self, plugin: object, pname: str) -> None:
        """Remove every trace of ``plugin`` from the plugin manager (any pluggy version)."""
        try:
            if self.pm.get_plugin(pname) is plugin or self.pm.is_registered(plugin):
                self.pm.unregister(plugin=plugin)
        except Exception:  # pragma: no cover - defensive: cleaned up below
            pass
        # pluggy < 1.7 may have added some hookimpls before rejecting one
        for caller in list(vars(self.pm.hook).values()):
            if not isinstance(caller, pluggy.HookCaller):
                continue
            if any(impl.plugin is plugin for impl in caller.get_hookimpls()):
                caller._remove_plugin(plugin)
        name2plugin = getattr(self.pm, "_name2plugin", None)
        if isinstance(name2plugin, dict) and name2plugin.get(pname) is plugin:
            del name2plugin[pname]

    def _check_hooknames(self, plugin: object, pname: str) -> None:
        # pluggy accepts a hookimpl whose name matches no spec; a typo like
        # "nnrt_register_layer" would then silently do nothing.
        for hookcaller in self.pm.get_hookcallers(plugin) or []:
            if hookcaller.spec is None:
                raise PluginError(
                    f"nnrt plugin {pname!r} implements unknown hook {hookcaller.name!r}; "
                    f"known hooks: {sorted(self._spec_names())}"
                )

    def _spec_names(self) -> list[str]:
        return [n for n in dir(hookspecs) if n.startswith("nnrt_")]

    def _call_register_hook(
        self, plugin: object, pname: str, hook: str, register: Callable[..., None], what: str
    ) -> None:
        """Call ``plugin``'s implementation of ``hook`` with ``register``; it must return None."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            kwargs: dict[str, Any] = {"register": register}
            try:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            except (PluginError, TypeError, ValueError):
                raise
            except Exception as exc:
                raise PluginError(
                    f"nnrt plugin {pname!r}: its {hook} hook raised {type(exc).__name__}: {exc}"
                ) from exc
            if result is not None:
                raise PluginError(
                    f"nnrt plugin {pname!r}: {hook} must return None and call "
                    f"register(name, {what}) for each one; it returned {type(result).__name__} "
                    f"{result!r:.80}"
                )

    @staticmethod
    def _free(
        pname: str, kind: str, name: str, clash: Any, obj: Any, refused: list[Refusal] | None
    ) -> bool:
        """True when ``name`` is free. A name another plugin holds is refused into
        ``refused`` (installed plugins: the rest of the plugin still loads) or raises."""
        if clash is None:
            return True
        where = f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else obj
        if refused is not None and clash.plugin != pname:
            refused.append(Refusal(kind, name, clash.plugin, str(where)))
            return False
        raise ValueError(
            f"nnrt plugin {pname!r} registers {kind} name {name!r}, which plugin "
            f"{clash.plugin!r} already registered ({where}); pick another name"
        )

    def _collect(
        self,
        plugin: object,
        pname: str,
        kind: str,
        refused: list[Refusal] | None,
        make: Callable[[str, Any], Any],
    ) -> dict[str, Any]:
        """Run ``plugin``'s register hook for ``kind`` ("layer", "loss", "optimizer").

        Each ``register(name, obj)`` is validated at once and staged as
        ``make(name, obj)``; a taken name is refused or raises (``_free``).
        """
        tables: dict[str, dict[str, Any]] = {
            "layer": self._layers,
            "loss": self._losses,
            "optimizer": self._optimizers,
        }
        validators: dict[str, Callable[[str, object, object], None]] = {
            "layer": self._validate_layer,
            "loss": _validate_loss,
            "optimizer": _validate_optimizer,
        }
        table, validate = tables[kind], validators[kind]
        staged: dict[str, Any] = {}

        def register(name: str, obj: Any, /) -> None:
            validate(pname, name, obj)
            clash = table.get(name) or staged.get(name)
            held = clash and (clash.fn if kind == "loss" else clash.cls)
            if self._free(pname, kind, name, clash, held, refused):
                staged[name] = make(name, obj)

        hook = "nnrt_register_losses" if kind == "loss" else f"nnrt_register_{kind}s"
        self._call_register_hook(plugin, pname, hook, register, "fn" if kind == "loss" else "cls")
        return staged

    def _collect_layers(
        self, plugin: object, pname: str, dist: str | None, refused: list[Refusal] | None = None
    ) -> dict[str, LayerEntry]:
        return self._collect(
            plugin, pname, "layer", refused, lambda n, c: LayerEntry(n, c, pname, dist)
        )

    def _collect_losses(
        self, plugin: object, pname: str, dist: str | None, refused: list[Refusal] | None = None
    ) -> dict[str, LossEntry]:
        return self._collect(
            plugin, pname, "loss", refused, lambda n, f: LossEntry(n, f, pname, dist)
        )

    def _collect_optimizers(
        self, plugin: object, pname: str, dist: str | None, refused: list[Refusal] | None = None
    ) -> dict[str, OptimizerEntry]:
        return self._collect(
            plugin, pname, "optimizer", refused, lambda n, c: OptimizerEntry(n, c, pname, dist)
        )

    @staticmethod
    def _validate_layer(pname: str, name: object, cls: object) -> None:
        _check_name(pname, "layer", name)
        if not isinstance(cls, type):
            raise TypeError(
                f"nnrt plugin {pname!r}: register({name!r}, cls) needs a class, "
                f"got {type(cls).__name__} {cls!r:.80}"
            )
        if not issubclass(cls, Layer):
            raise TypeError(
                f"nnrt plugin {pname!r}: layer {name!r} class {cls.__qualname__} is not a "
                f"subclass of nnrt.Layer"
            )
        missing = [m for m in _REQUIRED_OVERRIDES if not _defines(cls, m)]
        if missing:
            raise TypeError(
                f"nnrt plugin {pname!r}: layer {name!r} class {cls.__qualname__} does not "
                f"implement {', '.join(missing)}"
            )
        broken = [m for m in _REQUIRED_MEMBERS if not callable(getattr(cls, m, None))]
        if broken:
            raise TypeError(
                f"nnrt plugin {pname!r}: layer {name!r} class {cls.__qualname__} has "
                f"non-callable {', '.join(broken)}"
            )

    # ------------------------------------------------------------------ lookup
    def layers(self) -> dict[str, LayerEntry]:
        self.ensure_loaded()
        return dict(self._layers)

    def plugins(self) -> dict[str, PluginInfo]:
        self.ensure_loaded()
        return dict(self._plugins)

    def refused_plugins(self) -> list[PluginInfo]:
        """Installed entry points not loaded because another plugin holds their name."""
        self.ensure_loaded()
        return list(self._refused)

    def get(self, name: str) -> LayerEntry:
        self.ensure_loaded()
        try:
            return self._layers[name]
        except KeyError:
            known = ", ".join(sorted(self._layers)) or "(none: no plugins loaded)"
            raise KeyError(
                f"unknown nnrt layer {name!r}; registered layers: {known}. "
                f"Is the plugin that provides it installed (nnrt plugins)?"
            ) from None

    def name_of(self, cls: type) -> str | None:
        """The registry name under which ``cls`` was registered, if any."""
        self.ensure_loaded()
        for entry in self._layers.values():
            if entry.cls is cls:
                return entry.name
        return None

    def make(self, name: str, *args: Any, **kwargs: Any) -> Layer:
        return self.get(name).cls(*args, **kwargs)

    def losses(self) -> dict[str, LossEntry]:
        self.ensure_loaded()
        return dict(self._losses)

    def optimizers(self) -> dict[str, OptimizerEntry]:
        self.ensure_loaded()
        return dict(self._optimizers)

    def get_loss(self, name: str) -> LossEntry:
        self.ensure_loaded()
        return _lookup(self._losses, name, "loss", "losses")

    def get_optimizer(self, name: str) -> OptimizerEntry:
        self.ensure_loaded()
        return _lookup(self._optimizers, name, "optimizer", "optimizers")

    def resolve_loss(self, loss: Any) -> Callable[[Any, Any], tuple[float, Any]]:
        """The loss registered as ``loss`` (a name), or ``loss`` itself when it is callable.

        An unknown name raises KeyError listing the registered ones; anything
        that is neither a string nor callable raises TypeError.
        """
        if isinstance(loss, str):
            fn: Callable[[Any, Any], tuple[float, Any]] = self.get_loss(loss).fn
            return fn
        if callable(loss):
            return loss
        known = ", ".join(sorted(self.losses()))
        raise TypeError(
            f"loss must be a registered name ({known}) or a callable "
            f"(Y, target) -> (loss, dY), got {type(loss).__name__}"
        )

    def resolve_optimizer(self, optimizer: Any, net: Any, default: str = "adam") -> Any:
        """An optimizer over ``net``: ``optimizer`` itself (an instance with ``step()``),
        the one registered under that name built with its defaults, or ``default``
        for None."""
        if optimizer is None:
            optimizer = default
        if isinstance(optimizer, str):
            try:
                return self.make_optimizer(optimizer, net)
            except TypeError as exc:
                raise TypeError(
                    f"{exc}; pass a built optimizer instead, e.g. "
                    f"optimizer=nnrt.optimizer({optimizer!r}, net, lr=0.1)"
                ) from exc
        if not callable(getattr(optimizer, "step", None)):
            known = ", ".join(sorted(self.optimizers()))
            raise TypeError(
                f"optimizer must be a registered name ({known}) or an optimizer instance "
                f"with step() (e.g. nnrt.optimizer('adam', net)), got {type(optimizer).__name__}"
            )
        return optimizer

    def make_optimizer_from(self, name: str, net: Any, **hyper: Any) -> Any:
        """Build optimizer ``name`` over ``net`` with those of ``hyper`` its constructor takes.

        For front ends with a fixed set of knobs (the CLI's ``--lr``/``--momentum``/
        ``--weight-decay``, the scikit-learn estimators' ``lr``/``momentum``/
        ``weight_decay``): ``momentum`` goes to ``sgd`` and is not offered to
        ``adam``. A constructor with ``**kwargs`` gets every knob.
        """
        cls = self.get_optimizer(name).cls
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            accepted: dict[str, Any] = hyper
        else:
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                accepted = hyper
            else:
                accepted = {k: v for k, v in hyper.items() if k in params}
        return self.make_optimizer(name, net, **accepted)

    def make_optimizer(self, name: str, net: Any, **kwargs: Any) -> Any:
        """Build the optimizer registered as ``name`` over ``net``."""
        cls = self.get_optimizer(name).cls
        try:
            return cls(net, **kwargs)
        except TypeError as exc:
            raise TypeError(f"optimizer {name!r} ({cls.__qualname__}): {exc}") from exc

    def call_hook(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call hook ``hook`` of every plugin (for hooks beyond layer registration)."""
        self.ensure_loaded()
        caller: Callable[..., list[Any]] = getattr(self.pm.hook, hook)
        return caller(**kwargs)


def _lookup(table: dict[str, Any], name: object, kind: str, plural: str) -> Any:
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a str, got {type(name).__name__} {name!r:.80}")
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "(none)"
        raise KeyError(
            f"unknown {kind} {name!r}; registered {plural}: {known}. "
            f"Is the plugin that provides it installed (nnrt plugins)?"
        ) from None


registry = Registry()


def _new_lock_after_fork() -> None:
    # NOTE: a thread of the parent that held the registry lock at the fork does not
    # exist in the child, so the lock would stay held there forever (every first use
    # of the registry in the child would hang): the child gets a fresh one.
    registry._lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_lock_after_fork)


# ``nnrt.registry`` is this module; these names act on the process-wide ``registry``
# (``nnrt.registry.layers()`` and ``nnrt.registry.registry.layers()`` are the same call).
layers = registry.layers
plugins = registry.plugins
refused_plugins = registry.refused_plugins
get = registry.get
name_of = registry.name_of
make = registry.make
losses = registry.losses
optimizers = registry.optimizers
get_loss = registry.get_loss
get_optimizer = registry.get_optimizer
make_optimizer = registry.make_optimizer
register_plugin = registry.register_plugin
call_hook = registry.call_hook
pm = registry.pm  # the pluggy PluginManager (project "nnrt")
