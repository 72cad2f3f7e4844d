"""The training command line, generated from ``RunConfig``'s fields and the registries.

Train a network with block-local learning (BLL) or backprop (BP) and write the results:

    python experiments/run.py --task s2s_reverse
    python experiments/run.py --task s2s_reverse --method bp --layers 20 --out runs/bp20
    pyro-bll run --task s2s_reverse
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
import sys

from pyro_bll.config import COMMON_DEFAULTS, RunConfig
from pyro_bll.core.likelihoods import PRED_HEADS
from pyro_bll.families import FAMILIES
from pyro_bll.guides import FEEDBACKS, MESSAGES
from pyro_bll.methods import METHODS
from pyro_bll.models import RESNET_ARCHS
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


def _per_task(key: str, fallback: object = None) -> str:
    """An option's default for every task, for the help text: "s2s_reverse 50, ..."."""
    if fallback is None:
        fallback = COMMON_DEFAULTS.get(key, "-")
    return ", ".join(f"{n} {t.DEFAULTS.get(key, fallback)}" for n, t in TASKS.items())


# where a field's metadata says registry="name", its names come from here
REGISTRIES = {
    "tasks": TASKS,
    "methods": METHODS,
    "families": FAMILIES,
    "feedbacks": FEEDBACKS,
    "archs": RESNET_ARCHS,
    "messages": MESSAGES,
    "pred_heads": PRED_HEADS,
}
# the fields shown under their own heading (block-parallel training)
DISTRIBUTED = ("distributed", "replicas", "schedule", "rank_blocks", "dist_backend",
               "dist_timeout", "pipeline_depth")  # fmt: skip


def _task_defaulted(name: str) -> bool:
    return name in COMMON_DEFAULTS or any(name in t.DEFAULTS for t in TASKS.values())


def _add_field(p, f: dataclasses.Field) -> None:
    """One option generated from a RunConfig field and its metadata (``config._opt``)."""
    meta = dict(f.metadata)
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    kwargs: dict = {"metavar": meta.get("metavar")}
    names = list(REGISTRIES[meta["registry"]]) if "registry" in meta else None
    help_text = meta["help"].replace("{choices}", ", ".join(names or []))
    if _task_defaulted(f.name) and "(default" not in help_text:
        help_text += f" (default: {_per_task(f.name)})"
    if names is not None and not meta.get("validated_later"):
        kwargs["choices"] = sorted(names)
    elif "choices" in meta:
        kwargs["choices"] = list(meta["choices"])
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if f.name == "family_args":
        kwargs.update(action="append", type=_key_value, default=[], dest="family_arg")
    elif typ == "bool":  # a flag that flips the default (--no-augment for augment=True)
        kwargs = {"action": "store_false" if default else "store_true", "dest": f.name}
    elif typ == "list[str]":
        kwargs.update(type=_names, default=default)
    elif typ.startswith("list[int]"):
        kwargs.update(type=_int_list, default=default)
    else:
        base = typ.split("|")[0].strip()
        kwargs.update(default=default, type={"int": int, "float": float}.get(base))
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "default"}
    p.add_argument(flag, help=help_text, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from ``RunConfig``'s fields (help, choices, metavar)."""
    p = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dist = p.add_argument_group(
        "block-parallel training (launch with torchrun --nproc_per_node=K ... --distributed)"
    )
    for f in dataclasses.fields(RunConfig):
        _add_field(dist if f.name in DISTRIBUTED else p, f)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="after training, write the ArviZ InferenceData of forward/feedback agreement "
        "(first 200 test examples, 100 draws; pyro_bll.analysis.diagnostics) to OUT/diagnostics.nc",
    )
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, bool]:
    ns = build_parser().parse_args(argv)
    skip = ("family_arg", "no_progress", "diagnostics")
    fields = {k: v for k, v in vars(ns).items() if k not in skip}
    # options left unset (None) get the task's defaults in validate, as from Python
    cfg = RunConfig(**fields, family_args=dict(ns.family_arg))
    return cfg, not ns.no_progress


def resume_command(argv: list[str] | None) -> str:
    """This run's command line with ``--resume`` in place of ``--overwrite``."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "experiments/run.py", *args])
