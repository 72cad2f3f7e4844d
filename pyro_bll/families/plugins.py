"""Families from other packages: the ``pyro_bll.families`` entry-point group.

A package adds a family to ``--family`` without editing pyro_bll by advertising its
``Family`` subclass in its own ``pyproject.toml`` (docs/families.md, "Families from other
packages")::

    [project.entry-points."pyro_bll.families"]
    wrapped_cauchy = "my_package.families:WrappedCauchy"

The class's ``name`` is its registry name (name the entry point the same). ``FAMILIES``
is a ``FamilyRegistry``: the built-in families plus these plugins, read from the installed
packages' metadata the first time the registry is used (not when ``pyro_bll`` is imported,
so a plugin may import from ``pyro_bll`` freely). A plugin that cannot be used (it fails to
import, is not a complete ``Family`` subclass, or its name is a built-in's or another
plugin's) never breaks ``import pyro_bll``: it gets a ``FamilyPluginWarning`` naming it and
the fix, and ``make_family`` of its name raises ``FamilyError`` with the same line.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from pyro_bll.families.base import Family, FamilyError

GROUP = "pyro_bll.families"


class FamilyPluginWarning(UserWarning):
    """A package advertises a family under ``pyro_bll.families`` that cannot be used."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(ep: Any) -> str:
    """``plugin 'NAME' (module:attr from package DIST)``."""
    dist = getattr(ep, "dist", None)
    source = f" from package {dist.name}" if getattr(dist, "name", None) else ""
    return f"family plugin {ep.name!r} ({ep.value}{source})"


def _entry_points() -> list[Any]:
    """The entry points of the group (looked up on ``importlib.metadata`` at call time)."""
    return list(importlib.metadata.entry_points(group=GROUP))


def load_plugins(
    builtins: Mapping[str, type[Family]],
) -> tuple[dict[str, type[Family]], dict[str, str]]:
    """Load the group's entry points: (usable plugins by name, problems by name).

    Every problem is also warned about (``FamilyPluginWarning``), one line naming the
    plugin and the fix. Nothing here raises.
    """
    try:
        eps = _entry_points()
    except Exception as e:  # a broken installation's metadata must not break pyro_bll
        warnings.warn(
            f"could not read the {GROUP!r} entry points: {_one_line(e)}; "
            "family plugins are not available",
            FamilyPluginWarning,
            stacklevel=3,
        )
        return {}, {}
    found: dict[str, type[Family]] = {}
    sources: dict[str, str] = {}
    problems: dict[str, str] = {}
    for ep in eps:
        cls, problem = _load(ep)
        if cls is not None:
            name = cls.name
            if builtins.get(name) is cls:
                continue  # a package advertising a built-in family: nothing to add
            if name in builtins:  # the built-in keeps its name; only a warning
                problem = (
                    f"{_describe(ep)} is named {name!r}, the name of a built-in family, "
                    f"which --family {name} keeps; rename the plugin class's name"
                )
            elif name in found or name in problems:
                problem = (
                    f"{_describe(ep)} and {sources.get(name, 'another plugin')} are both "
                    f"named {name!r}; uninstall one or rename its class's name"
                )
                found.pop(name, None)
                problems[name] = problem
            else:
                found[name], sources[name] = cls, _describe(ep)
                continue
        elif ep.name not in builtins:
            problems[ep.name] = problem
        warnings.warn(problem, FamilyPluginWarning, stacklevel=3)
    return found, problems


def _load(ep: Any) -> tuple[type[Family] | None, str]:
    """(the plugin's Family class, "") or (None, the one-line problem and fix)."""
    where = _describe(ep)
    try:
        obj = ep.load()
    except Exception as e:
        return None, (
            f"{where} failed to import ({type(e).__name__}: {_one_line(e)}); "
            "fix that package or uninstall it"
        )
    if not (isinstance(obj, type) and issubclass(obj, Family)):
        return None, (
            f"{where} is {obj!r}, not a subclass of pyro_bll.families.Family; "
            "point the entry point at the family class"
        )
    try:
        obj.check_class()
    except FamilyError as e:
        return None, f"{where}: {_one_line(e)}; fix the class in that package"
    return obj, ""


class FamilyRegistry(MutableMapping[str, type[Family]]):
    """``FAMILIES``: name -> Family class, the built-ins first, then the entry-point
    plugins, loaded on first use. ``broken`` holds, by name, why a plugin was refused;
    ``reload()`` reads the entry points again (e.g. after installing a package)."""

    def __init__(self, builtins: Mapping[str, type[Family]]) -> None:
        self._builtins = dict(builtins)
        self._families: dict[str, type[Family]] | None = None
        self._broken: dict[str, str] = {}

    def _all(self) -> dict[str, type[Family]]:
        if self._families is None:
            plugins, self._broken = load_plugins(self._builtins)
            self._families = {**self._builtins, **plugins}
        return self._families

    def reload(self) -> None:
        """Forget the plugins and read the entry points again."""
        self._families = None
        self._all()

    @property
    def broken(self) -> dict[str, str]:
        """Plugins refused at load: name -> the one-line reason and fix."""
        self._all()
        return dict(self._broken)

    @property
    def plugins(self) -> dict[str, type[Family]]:
        """The families that came from entry points."""
        return {k: v for k, v in self._all().items() if k not in self._builtins}

    def __getitem__(self, name: str) -> type[Family]:
        return self._all()[name]

    def __setitem__(self, name: str, cls: type[Family]) -> None:
        self._all()[name] = cls
        self._builtins[name] = cls  # kept by reload()

    def __delitem__(self, name: str) -> None:
        del self._all()[name]
        self._builtins.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __repr__(self) -> str:
        return f"FamilyRegistry({self._all()!r})"
