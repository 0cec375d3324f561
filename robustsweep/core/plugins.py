"""Components from other packages: the ``robustsweep.plugins`` entry-point group.

A package adds attacks, compression stages, evaluators or certificates without an edit to
robustsweep, as Hydra's own plug-ins and pytest's ``pytest11`` do::

    # the plug-in's pyproject.toml
    [project.entry-points."robustsweep.plugins"]
    margin = "mypkg.margin"     # name: the config group its YAMLs are in; value: the module

- **The module** registers its components when imported, as robustsweep's own modules do
  (``ATTACKS.register``, ``register_evaluator``, ``register_stage``). It is imported on the first
  lookup of any registry, evaluator or stage list (``load``), never at start-up.
- **The name** is the config group the component is chosen by: a group robustsweep has (``attack``)
  or a new one (``margin``). A new group becomes a key of the schema (``core.schema.Config``, ``None``
  until chosen, which is "off" and leaves every cell id as it was), so ``+margin=on`` composes.
- **The YAMLs** live in ``conf/<group>/<option>.yaml`` beside the module's top-level package
  (``mypkg/conf/margin/on.yaml``); the Hydra search-path plug-in
  (``hydra_plugins/robustsweep_plugins``) adds each such folder to Hydra's search path.

Discovery reads installed distributions' metadata (``importlib.metadata``): a package installed
with pip, or any folder on ``sys.path`` (``PYTHONPATH``) holding the package and its
``<name>.dist-info/entry_points.txt``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

log = logging.getLogger(__name__)

GROUP = "robustsweep.plugins"
_loaded = False


def _any_declared() -> bool:
    """Whether any distribution on ``sys.path`` declares the group: a text search of the
    ``entry_points.txt`` files (~3 ms for 150 distributions), so that a process without plug-ins does
    not pay for ``importlib.metadata`` (~50-70 ms: import, then parsing every distribution) at each
    start-up -- Hydra's start, every worker's."""
    header = f"[{GROUP}]"
    for d in sys.path:
        try:
            entries = os.scandir(d or ".")
        except OSError:
            continue
        with entries:
            for e in entries:
                if e.name.endswith((".dist-info", ".egg-info")):
                    try:
                        with open(os.path.join(e.path, "entry_points.txt"), encoding="utf-8") as f:
                            if header in f.read():
                                return True
                    except OSError:
                        continue
    return False


@cache
def declared() -> tuple[EntryPoint, ...]:
    """The installed entry points of the group, sorted by name (read once per process)."""
    if not _any_declared():
        return ()
    from importlib.metadata import entry_points

    return tuple(sorted(entry_points(group=GROUP), key=lambda ep: (ep.name, ep.value)))


def groups() -> tuple[str, ...]:
    """The config groups plug-ins are chosen by (a name may be one of robustsweep's own groups)."""
    return tuple(dict.fromkeys(ep.name for ep in declared()))


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def load() -> None:
    """Import every plug-in module once (each registers its components). A module that fails to
    import is an error naming the entry point and its distribution: a component silently missing
    would change what a sweep computes."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before importing: a plug-in module looks things up in the registries itself
    for ep in declared():
        try:
            importlib.import_module(ep.module)
        except Exception as e:
            _loaded = False  # the next lookup raises again rather than run without it
            raise ImportError(f"robustsweep plug-in {ep.name} = {ep.value} (entry point group {GROUP}, "
                              f"from {_origin(ep)}) failed to import: {type(e).__name__}: {e}") from e
        log.debug("plug-in %s = %s loaded (%s)", ep.name, ep.value, _origin(ep))


def conf_dirs() -> list[Path]:
    """The ``conf/`` folder beside each plug-in's top-level package, where it has one (found without
    importing the plug-in)."""
    out: list[Path] = []
    for ep in declared():
        spec = importlib.util.find_spec(ep.module.split(".")[0])
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            d = Path(loc) / "conf"
            if d.is_dir() and d not in out:
                out.append(d)
    return out
