"""How options are declared: data only, at the bottom of the import graph.

Every part of the package that reads options declares them beside its code, as a small
frozen dataclass (a *section*, subclass of ``Section``) whose fields carry their
command-line metadata (``option``): the methods (``pyro_bll.methods.bll.BLLOptions``...),
the tasks (``pyro_bll.tasks.base.NetworkOptions``, ``pyro_bll.tasks.vision.VisionOptions``
...) and the runtime (``pyro_bll.run.options``, ``pyro_bll.run.distributed_options``).
``pyro_bll.run.options.RunConfig`` resolves the options a user gives, once, into one
frozen object of the sections that apply to the chosen task and method; the parser
(``pyro_bll.run.parser``) and the options reference (docs/options.md) are generated
from the same declarations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2."""


Check = Callable[[Any], "str | None"]


def option(
    default: Any = None,
    help: str = "",  # noqa: A002 (argparse's name)
    *,
    factory: Any = None,
    choices: Any = None,
    check: Check | None = None,
    **meta: Any,
) -> Any:
    """A section field with its command-line metadata.

    Args:
        default: the value when neither the user nor the task sets it.
        help: help text; ``{choices}`` is replaced by the names of ``choices``.
        factory: a default factory (lists, dicts) in place of ``default``.
        choices: where the valid values come from: a registry (a mapping: its keys), a
            tuple of names defined beside the code that reads them, or a callable
            returning either (for registries above the declaring module); checked when
            the options are resolved, and listed by ``--help``.
        check: ``check(value)`` returns why a value is refused (without the flag), or None.
        meta: ``metavar``, ``flag`` (when the flag is not ``--field-name``), ``parse``
            (``"list[str]"``, ``"list[int]"`` or ``"key=value"``: how the text is read),
            ``validated_later`` (the parser leaves the choices to the resolution, whose
            message lists them: the task, the method, the family).
    """
    meta = {"help": help, "choices": choices, "check": check, **meta}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choice_names(choices: Any) -> list[str]:
    """The valid names of an option's ``choices`` (a registry, a tuple or a callable)."""
    if callable(choices) and not isinstance(choices, type):
        choices = choices()
    return list(choices)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


class Section:
    """Base of the options one part of the package owns: a frozen dataclass per owner.

    ``name`` is the section's key in ``config.json`` and its attribute on
    ``RunConfig``; ``title`` heads its group in ``--help`` and in docs/options.md;
    ``applies_to`` says, in refusals, which runs read it.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    applies_to: ClassVar[str] = "every run"

    @classmethod
    def options(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)  # type: ignore[arg-type]

    @classmethod
    def make(cls, values: dict[str, Any]) -> Section:
        """The section from resolved ``values``, each option checked against its
        ``choices`` and ``check`` (ConfigError naming the flag)."""
        for f in cls.options():
            if f.name in values:
                check_value(f, values[f.name])
        return cls(**{f.name: values[f.name] for f in cls.options() if f.name in values})

    def check(self, cfg: Any) -> None:  # noqa: B027 (a hook: most sections need nothing)
        """Checks across options (``cfg``: the whole resolved ``RunConfig``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def check_value(f: dataclasses.Field, value: Any) -> None:
    flag, meta = flag_of(f), f.metadata
    if meta.get("choices") is not None and value is not None:
        names = choice_names(meta["choices"])
        values = value if isinstance(value, list | tuple) else [value]
        unknown = [v for v in values if v not in names]
        if unknown:
            if isinstance(value, list | tuple):  # a comma-separated list, as it was typed
                shown, valid = ",".join(map(str, unknown)), ",".join(names)
                raise ConfigError(f"unknown {flag} {shown}; valid: {valid}")
            what = f.name.replace("_", " ")
            raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(names)}")
    if meta.get("check") is not None and value is not None:
        why = meta["check"](value)
        if why:
            raise ConfigError(f"{flag} {why}, got {value}")


# ---- checks an option's metadata names ------------------------------------------------
def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def unit_interval(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must lie in [0, 1]"


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def finite_positive(value: float) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be positive"


def is_sectioned(d: dict[str, Any]) -> bool:
    """Whether a stored configuration is ``RunConfig.to_dict``'s sectioned format (not the
    older flat one)."""
    return isinstance(d.get("run"), dict)


def flat_config(d: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration as one flat dict of options: the sectioned format of
    ``RunConfig.to_dict`` merged, or a run saved in the older flat format as it is."""
    if is_sectioned(d):
        return {k: v for section in d.values() for k, v in section.items()}
    return dict(d)


def section_names(sections: Iterable[type[Section]]) -> dict[str, type[Section]]:
    """Option name -> the section that declares it (each name declared once)."""
    owner: dict[str, type[Section]] = {}
    for s in sections:
        for f in s.options():
            if f.name in owner:
                raise AssertionError(f"option {f.name} declared by {owner[f.name]} and {s}")
            owner[f.name] = s
    return owner
