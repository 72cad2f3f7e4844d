"""The training command line and the options reference, generated from the sections.

Train a network with block-local learning (BLL) or backprop (BP) and write the results:

    python experiments/run.py --task s2s_reverse
    python experiments/run.py --task s2s_reverse --method bp --layers 20 --out runs/bp20
    pyro-bll run --task s2s_reverse

Every option belongs to the section of the part that reads it (``pyro_bll.run.options``);
an option of a section that does not apply to the chosen task and method is refused.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
import sys
from typing import Any

from pyro_bll.config import Section, choice_names, flag_of
from pyro_bll.run.options import SECTIONS, RunConfig, users
from pyro_bll.tasks import TASKS


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _names(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (an empty string: no names)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def default_text(f: dataclasses.Field) -> str:
    """An option's default, with the tasks that set another one: "50 (cifar10 128, ...)"."""
    own = [f"{n} {_shown(t.DEFAULTS[f.name])}" for n, t in TASKS.items() if f.name in t.DEFAULTS]
    text = _shown(_default(f))
    return f"{text} ({', '.join(own)})" if own else text


def help_text(f: dataclasses.Field) -> str:
    meta = f.metadata
    names = choice_names(meta["choices"]) if meta.get("choices") is not None else []
    return meta["help"].replace("{choices}", ", ".join(names))


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    """One option generated from a section field and its metadata (``config.option``)."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    help_ = help_text(f)
    parse = meta.get("parse")
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if typ == "bool":  # a flag that flips the default (--no-augment for augment=True)
        kwargs["action"] = "store_false" if _default(f) else "store_true"
    else:
        help_ += f" (default: {default_text(f)})"
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if parse == "key=value":
            kwargs.update(action="append", type=_key_value)
        elif parse == "list[str]":
            kwargs["type"] = _names
        elif parse == "list[int]":
            kwargs["type"] = _int_list
        else:
            kwargs["type"] = {"int": int, "float": float}.get(typ.split("|")[0].strip())
            if meta.get("choices") is not None and not meta.get("validated_later"):
                names = choice_names(meta["choices"])  # a registry's sorted, a tuple's in order
                kwargs["choices"] = names if isinstance(meta["choices"], tuple) else sorted(names)
    group.add_argument(flag_of(f), help=help_, **kwargs)


def _group_title(section: type[Section]) -> str:
    return f"{section.title}; applies to {users(section)}"


def build_parser() -> argparse.ArgumentParser:
    """The command line: one group per section, generated from the sections' fields."""
    p = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for section in SECTIONS:
        group = p.add_argument_group(_group_title(section), section.__doc__)
        for f in section.options():
            _add_option(group, f)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="after training, write the ArviZ InferenceData of forward/feedback agreement "
        "(first 200 test examples, 100 draws; pyro_bll.analysis.diagnostics) to OUT/diagnostics.nc",
    )
    return p


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, bool]:
    """The resolved configuration of a command line (ConfigError: one line) and whether
    to show the progress bar."""
    ns = vars(build_parser().parse_args(argv))
    progress = not ns.pop("no_progress")
    ns.pop("diagnostics")
    if "family_args" in ns:
        ns["family_args"] = dict(ns["family_args"])
    return RunConfig(**ns), progress


def resume_command(argv: list[str] | None) -> str:
    """This run's command line with ``--resume`` in place of ``--overwrite``."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "experiments/run.py", *args])


def options_reference() -> str:
    """docs/options.md: every option of every section, generated from the declarations
    (``python experiments/options_reference.py`` writes it; a test compares)."""
    lines = [
        "# Options reference",
        "",
        "<!-- generated by experiments/options_reference.py from the option sections; "
        "do not edit -->",
        "",
        "Every option is declared by the part of the package that reads it, in a section "
        "(a frozen dataclass beside its code). A run's configuration holds the sections "
        "that apply to its task and method; an option of another section is refused. "
        "`config.json` records the resolved values of those sections.",
    ]
    for section in SECTIONS:
        lines += ["", f"## {section.title}", "", f"Section `{section.name}` "
                  f"(`{section.__module__}.{section.__qualname__}`), applies to "
                  f"{users(section)}. {section.__doc__}", "",
                  "| option | default | description |", "| --- | --- | --- |"]  # fmt: skip
        for f in section.options():
            text = help_text(f).replace("|", "\\|")
            default = "off" if f.type == "bool" and not _default(f) else default_text(f)
            if f.type == "bool" and _default(f):
                default = "on"
            lines.append(f"| `{flag_of(f)}` | {default.replace('|', chr(92) + '|')} | {text} |")
    return "\n".join(lines) + "\n"


__all__ = ["build_parser", "options_reference", "parse_config", "resume_command"]
