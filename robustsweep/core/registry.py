"""Plug-ins chosen by config groups.

A ``Registry`` holds the named plug-ins of one config group (``model``, ``prune``, ``attack``,
``objective``, ...). A group node picks one by name (``name: small_cnn``; the key is ``method`` for
prune) or brings its own with ``_target_: mypkg.nets.wide_resnet`` — any importable callable with
the same signature as the registered ones (Hydra users expect ``_target_``). Each plug-in may come
with ``check(node, cfg)``, its own key checks (``cfg``: the whole config, for cross-key rules),
which ``robustsweep.config.validate`` asks before anything runs: the checks live with the component,
not in one function with ``if name == ...``.

Plug-ins may live in modules that import the registry's own module (``steps/attack_zoo.py`` builds
on ``steps/attacks.py``). Such modules are named in ``plugins`` and imported on first lookup, as
Hydra and setuptools discover plug-ins, so the registry is complete whoever asks first and the
modules import each other in one direction only. Other packages' plug-ins (entry-point group
``robustsweep.plugins``, robustsweep.core.plugins) are imported on that first lookup too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf

from robustsweep.core import plugins as outside
from robustsweep.core.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
TARGET = "_target_"


def import_callable(key: str, path: Any) -> Callable[..., Any]:
    """The callable at dotted ``path`` (``pkg.module.attr[.attr]``); ConfigError naming ``key``."""
    allowed = "a dotted path to an importable callable, e.g. mypkg.nets.wide_resnet"
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ConfigError(f"{key}={path!r} is not valid; allowed: {allowed}")
    parts = path.split(".")
    err: Exception | None = None
    for i in range(len(parts) - 1, 0, -1):  # longest importable module prefix, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError as e:
            err = err or e
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError as e:
            raise ConfigError(f"{key}={path!r} is not importable ({e}); allowed: {allowed}") from None
        if not callable(obj):
            raise ConfigError(f"{key}={path!r} is a {type(obj).__name__}, not callable; allowed: {allowed}")
        return obj
    raise ConfigError(f"{key}={path!r} is not importable ({type(err).__name__}: {err}); allowed: {allowed}")


OFF = "none"


def is_off(node: Any) -> bool:
    """The one reading of "off" for every group: ``None`` (a plug-in's group not chosen), or a node
    without ``_target_`` whose name -- ``method`` for prune and attribution, the key they are chosen
    by -- is ``none``. A node without either key (``train``, ``compress``) is never off."""
    if node is None:
        return True
    if not isinstance(node, Mapping) or node.get(TARGET):
        return False
    return OFF in (node.get("name"), node.get("method"))


class Registry(dict[str, F], Generic[F]):
    """A dict of named plug-ins for config group ``group``; ``@registry.register("name")`` adds one."""

    BY_GROUP: ClassVar[dict[str, Registry]] = {}  # every registry by its config group (strict keys)

    def __init__(self, group: str, key: str = "name", plugins: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.group, self.key = group, key
        Registry.BY_GROUP[group] = self
        self.checks: dict[str, Callable[[DictConfig, DictConfig], None]] = {}
        # what a plug-in costs, from its node (robustsweep.core.cost: image passes; what the passes
        # are per depends on the group: per attacked image, per training image)
        self.works: dict[str, Callable[[DictConfig], Any]] = {}
        # what a plug-in is, declared with it (an attack's norms: robustsweep.steps.attacks.AttackInfo)
        self.infos: dict[str, Any] = {}
        self._plugins = plugins  # modules registering more plug-ins, imported on first lookup

    def discover(self) -> None:
        """Import the ``plugins`` modules (once), then other packages' plug-ins
        (robustsweep.core.plugins); each registers its plug-ins here."""
        plugins, self._plugins = self._plugins, ()
        for module in plugins:
            importlib.import_module(module)
        outside.load()

    def __contains__(self, name: object) -> bool:
        self.discover()
        return super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return super().__iter__()

    def __getitem__(self, name: str) -> F:
        self.discover()
        return super().__getitem__(name)

    def register(self, name: str, check: Callable[[DictConfig, DictConfig], None] | None = None,
                 work: Callable[[DictConfig], Any] | None = None, info: Any = None) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            self[name] = fn
            if check is not None:
                self.checks[name] = check
            if work is not None:
                self.works[name] = work
            if info is not None:
                self.infos[name] = info
            return fn

        return deco

    def info(self, node: DictConfig | dict, default: Any = None) -> Any:
        """What the chosen plug-in declared about itself (``register(info=...)``); ``default`` for a
        ``_target_`` plug-in or one that declared nothing."""
        self.discover()
        return default if node.get(TARGET) else self.infos.get(node.get(self.key), default)

    def work(self, node: DictConfig) -> Any:
        """The chosen plug-in's declared work for ``node``; None when it declares none (a
        ``_target_`` plug-in, or one registered without ``work=``)."""
        self.discover()
        if node.get(TARGET) or (declare := self.works.get(node.get(self.key))) is None:
            return None
        return declare(node)

    def name_of(self, node: DictConfig) -> str:
        """The plug-in's name: ``node.<key>``, or its ``_target_`` path."""
        return str(node.get(TARGET) or node.get(self.key))

    def resolve(self, node: DictConfig) -> F:
        """The plug-in ``node`` picks; ConfigError naming the key and the allowed names."""
        target = node.get(TARGET)
        if target:
            return import_callable(f"{self.group}.{TARGET}", target)  # type: ignore[return-value]
        name = node.get(self.key)
        if name not in self:
            raise ConfigError(f"{self.group}.{self.key}={name!r} is not valid; allowed: "
                              f"{', '.join(sorted(self))}, or {self.group}.{TARGET}=<pkg.module.callable>")
        return self[name]

    def validate(self, node: Any, cfg: DictConfig) -> None:
        """Resolve ``node`` and run the chosen plug-in's own checks."""
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{self.group}={node!r} is not valid; allowed: a config group, pick one "
                              f"with {self.group}=<option> ({', '.join(sorted(self))})")
        self.resolve(node)
        self.discover()
        if not node.get(TARGET) and (check := self.checks.get(node.get(self.key))):
            check(node, cfg)

    def kwargs(self, node: DictConfig, *drop: str) -> dict[str, Any]:
        """The node's keys as keyword arguments for the plug-in (minus name, ``_target_``, ``drop``)."""
        return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                if k not in (self.key, TARGET, *drop)}
