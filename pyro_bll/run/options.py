"""A run's options, resolved once into one frozen object of the sections that apply.

Every part declares the options it reads beside its code, as a section (a frozen
dataclass of ``pyro_bll.config.option`` fields): the runtime here (``RunOptions``,
``TrainingOptions``) and in ``distributed_options`` (``DistributedOptions``), the tasks
(``NetworkOptions``, ``DataOptions`` for every task; ``LayerStackOptions``,
``SequenceOptions``, ``ImageOptions``, ``VisionOptions`` for the tasks naming them in
``SECTIONS``) and the methods (``BLLOptions``, ``PredSimOptions``: a method's
``SECTION``). ``RunConfig(**options)`` takes the options flat, routes each to its
section and resolves the defaults once:

    1. the option as given (``None``: not given);
    2. the defaults that depend on the family and the method: ``--propagate`` is the
       family's ``default_propagate`` on tasks whose blocks read parameters
       (``params_propagation``), ``--backward`` is joint for methods without block-local
       losses, ``--likelihood`` the family's own;
    3. the task's ``DEFAULTS``;
    4. the option's declared default.

An option given for a section that does not apply to the chosen task and method (or
without ``--distributed``) is refused with one line naming what it applies to. The
result is frozen and checked (each option's ``choices`` and ``check``, then each
section's and the task's checks across options); ``to_dict`` is what ``config.json``
records: the resolved values of the sections that apply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pyro_bll.config import (
    ConfigError,
    Section,
    check_value,
    flag_of,
    flat_config,
    is_sectioned,
    non_negative,
    option,
    positive,
    section_names,
)
from pyro_bll.families import FAMILIES
from pyro_bll.methods import METHODS, BLLOptions, PredSimOptions
from pyro_bll.run.compile import compile_unavailable
from pyro_bll.run.distributed_options import DistributedOptions
from pyro_bll.run.step import BACKWARD_MODES, LR_SCHEDULES
from pyro_bll.tasks import TASKS
from pyro_bll.tasks.base import (
    TASK_SECTIONS,
    DataOptions,
    ImageOptions,
    LayerStackOptions,
    NetworkOptions,
)
from pyro_bll.tasks.s2s_reverse import SequenceOptions
from pyro_bll.tasks.vision import VisionOptions


def _device(value: str) -> str | None:
    return None if value == "cpu" or value.startswith("cuda") else "must be cpu or cuda[:N]"


@dataclass(frozen=True)
class RunOptions(Section):
    """What is run, where, and what happens to its directory."""

    name = "run"
    title = "run"

    task: str = option(
        "s2s_reverse", "task to train on: {choices}", choices=TASKS, validated_later=True
    )
    method: str = option(
        "bll",
        "{choices}: bll trains every block on its own local loss (no backward pass "
        "across blocks); bp is end-to-end backprop on the same network; fa is "
        "backprop with fixed random backward weights for every Linear and Conv2d "
        "(feedback alignment); predsim trains every block on Noekland & Eidnes' local"
        " prediction + similarity-matching loss",
        choices=METHODS,
        validated_later=True,
    )
    seed: int = option(0, "random seed (data, init, noise)")
    out: str = option(
        "runs/s2s_reverse", "run directory for config, metrics.json, checkpoints and plots"
    )
    device: str = option("cpu", "cpu or cuda[:N]", check=_device)
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    amp: bool = option(False, "bf16 autocast of forward passes and losses (needs --device cuda)")
    max_minutes: float | None = option(
        None,
        "time budget of training plus evaluation: stop after the epoch during which "
        "it is used up (metrics.json: elapsed_seconds, budget_exhausted)",
        check=positive,
    )
    checkpoint_every: int | None = option(
        None,
        "also write a checkpoint every N training steps inside an epoch (for long "
        "epochs); --resume continues from it mid-epoch",
        metavar="N",
        check=positive,
    )
    resume: bool = option(False, "continue from the newest checkpoint in --out")
    overwrite: bool = option(
        False, "start afresh in an --out that already holds checkpoints (they are replaced)"
    )
    compile: bool = option(
        False,
        "compile every block and head with torch.compile (the first step pays the "
        "compilation; measured not to pay on the 2-core CPU: docs/results.md); refused "
        "where the platform cannot compile",
    )
    distributed: bool = option(
        False,
        "one process (rank) per group of blocks, forward messages sent rank to rank "
        "with torch.distributed; every rank trains its own blocks (--method bll); "
        "--method bp: data parallel over all ranks (gradients averaged, as DDP)",
    )

    def check(self, cfg: Any) -> None:
        if self.amp and not self.device.startswith("cuda"):
            raise ConfigError("--amp (bf16 autocast) needs --device cuda; drop --amp on CPU")
        why = compile_unavailable(self.device) if self.compile else None
        if why is not None:
            raise ConfigError(f"--compile: {why}; install one or drop --compile")


@dataclass(frozen=True)
class TrainingOptions(Section):
    """The optimiser, its schedule and how the gradients are computed."""

    name = "training"
    title = "training"

    epochs: int = option(5, "training epochs", check=positive)
    batch_size: int = option(50, "mini-batch size", check=positive)
    lr: float = option(2e-3, "Adam learning rate", check=positive)
    lr_schedule: str = option(
        "constant",
        "{choices}: constant, or cosine: the learning rate decays per step to 0 over --epochs",
        choices=LR_SCHEDULES,
    )
    clip_grad: float = option(
        0.0,
        "largest L2 norm of each block's gradient before the Adam step, clipped block "
        "by block over the parameters the block owns (its layers, feedback part and "
        "heads), so it stays block-local; 0 switches it off (measured in "
        "docs/results.md: e.g. 1.0 stops the late blow-up of one 20-block Gamma run)",
        check=non_negative,
    )
    backward: str = option(
        "joint",
        "{choices}; per-block: backpropagate each block's local loss and free its graph "
        "before the next block runs (activation memory of one block at a time); joint: "
        "one backward over the summed local losses. Same gradients either way; "
        "per-block needs bll or predsim (bp and fa: joint)",
        choices=BACKWARD_MODES,
    )

    def check(self, cfg: Any) -> None:
        if self.backward == "per-block" and not METHODS[cfg.method].local:
            raise ConfigError(
                f"--backward per-block needs block-local losses (--method bll or predsim); "
                f"--method {cfg.method} has one loss over the whole network: use --backward "
                "joint"
            )


# every section, in the order of --help and docs/options.md
SECTIONS: tuple[type[Section], ...] = (
    RunOptions,
    TrainingOptions,
    NetworkOptions,
    DataOptions,
    LayerStackOptions,
    SequenceOptions,
    ImageOptions,
    VisionOptions,
    BLLOptions,
    PredSimOptions,
    DistributedOptions,
)
ALWAYS: tuple[type[Section], ...] = (RunOptions, TrainingOptions, *TASK_SECTIONS)
OWNER: dict[str, type[Section]] = section_names(SECTIONS)


def applicable(task: str, method: str, distributed: bool) -> tuple[type[Section], ...]:
    """The sections a run of ``task`` and ``method`` reads, in ``SECTIONS`` order."""
    own = {*ALWAYS, *TASKS[task].SECTIONS}
    if METHODS[method].SECTION is not None:
        own.add(METHODS[method].SECTION)
    if distributed:
        own.add(DistributedOptions)
    return tuple(s for s in SECTIONS if s in own)


def users(section: type[Section]) -> str:
    """Who reads ``section``, for refusals: from the registries."""
    methods = [m for m, cls in METHODS.items() if cls.SECTION is section]
    if methods:
        return f"--method {' / '.join(methods)} only"
    tasks = [t for t, cls in TASKS.items() if section in cls.SECTIONS]
    if tasks and not section.applies_to.startswith("--task"):
        return f"{section.applies_to} (--task {' / '.join(tasks)})"
    return section.applies_to


def _refusal(name: str, task: str, method: str) -> ConfigError:
    section = OWNER[name]
    flag = flag_of(next(f for f in section.options() if f.name == name))
    if section is DistributedOptions:
        return ConfigError(
            f"{flag} applies to --distributed runs only; add --distributed or drop it"
        )
    which = (
        f"--method {method}"
        if any(c.SECTION is section for c in METHODS.values())
        else (f"--task {task}")
    )
    return ConfigError(f"{flag} applies to {users(section)}; drop it for {which}")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _field(name: str) -> dataclasses.Field:
    return next(f for f in OWNER[name].options() if f.name == name)


def _resolve(given: dict[str, Any]) -> dict[str, Section]:
    """Steps 2 to 4 of the module docstring, for options already known to apply."""
    task, method = TASKS[given["task"]], METHODS[given["method"]]
    sections = applicable(given["task"], given["method"], bool(given.get("distributed")))
    values = {f.name: _default(f) for s in sections for f in s.options()}
    values.update({k: v for k, v in task.DEFAULTS.items() if k in values})
    values.update(given)
    check_value(_field("family"), values["family"])
    family = FAMILIES[values["family"]]
    if "propagate" not in given and task.params_propagation:
        values["propagate"] = family.default_propagate
    if "backward" not in given and not method.local:
        values["backward"] = "joint"  # one loss over the whole network
    if "likelihood" in values and values["likelihood"] is None:
        values["likelihood"] = family.default_likelihood
    return {s.name: s.make(values) for s in sections}


def _given(options: dict[str, Any], stored: bool) -> dict[str, Any]:
    """The options set (not None), with task and method; ConfigError for unknown names
    and, unless ``stored`` (a saved run's: those are dropped), for inapplicable ones."""
    unknown = [k for k in options if k not in OWNER]
    if unknown and not stored:
        raise ConfigError(f"unknown option {unknown[0]!r}; see --help")
    given = {k: v for k, v in options.items() if v is not None and k in OWNER}
    for name in ("task", "method"):
        given.setdefault(name, _default(_field(name)))
        check_value(_field(name), given[name])
    own = applicable(given["task"], given["method"], bool(given.get("distributed")))
    outside = [k for k in given if OWNER[k] not in own]
    if outside and not stored:
        raise _refusal(outside[0], given["task"], given["method"])
    return {k: v for k, v in given.items() if k not in outside}


@dataclass(frozen=True, init=False)
class RunConfig:
    """Everything a run needs: one section per owner, ``None`` where it does not apply.

    ``RunConfig(task=..., layers=..., ...)`` takes the options flat (``None``: not given)
    and resolves them (module docstring); an option also reads flat (``cfg.lr`` is
    ``cfg.training.lr``), and ``replace`` resolves again with some options changed.
    """

    run: RunOptions
    training: TrainingOptions
    network: NetworkOptions
    data: DataOptions
    stack: LayerStackOptions | None
    sequence: SequenceOptions | None
    images: ImageOptions | None
    vision: VisionOptions | None
    bll: BLLOptions | None
    predsim: PredSimOptions | None
    dist: DistributedOptions | None
    # the options as given (``replace`` starts from them); not part of the configuration
    given: dict[str, Any] = field(compare=False, repr=False)
    # read from a saved run (``from_dict``): every value there is a resolved one
    loaded: bool = field(compare=False, repr=False)

    def __init__(self, **options: Any) -> None:
        self._setup(options, stored=False)

    def _setup(self, options: dict[str, Any], stored: bool) -> None:
        given = _given(options, stored)
        sections = _resolve(given)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, sections.get(f.name))
        object.__setattr__(self, "given", given)
        object.__setattr__(self, "loaded", stored)
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, Section):
                section.check(self)
        TASKS[self.task].check_config(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A stored configuration: ``to_dict``'s sections, or a run saved in the older
        flat format (every option, unset ones as null): the options of sections that do
        not apply to its task and method are dropped there, the others resolved anew."""
        flat = flat_config(d)
        if not is_sectioned(d) and flat.get("likelihood", "") is None:
            flat["likelihood"] = "bound"  # every family's default when that format was written
        cfg = cls.__new__(cls)
        cfg._setup(flat, stored=True)
        return cfg

    def __getattr__(self, name: str) -> Any:
        """``cfg.NAME``: the option of the section that declares it."""
        if name.startswith("_") or name not in OWNER:
            raise AttributeError(name)
        section = object.__getattribute__(self, OWNER[name].name)
        if section is None:
            raise AttributeError(
                f"{flag_of(_field(name))} is not part of this run's configuration: it "
                f"applies to {users(OWNER[name])}"
            )
        return getattr(section, name)

    @property
    def num_blocks(self) -> int:
        blocks = self.network.blocks
        return self.stack.layers if blocks is None and self.stack is not None else blocks

    def sections(self) -> list[Section]:
        """The sections that apply to this run."""
        return [
            s for f in dataclasses.fields(self) if isinstance(s := getattr(self, f.name), Section)
        ]

    def replace(self, **options: Any) -> RunConfig:
        """The options as given with ``options`` changed (``None``: back to the default),
        resolved again (a saved run's values as ``from_dict`` reads them)."""
        if self.loaded:
            return RunConfig.from_dict({**self.given, **options})
        return RunConfig(**{**self.given, **options})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved values of the sections that apply (``config.json``)."""
        return {s.name: s.to_dict() for s in self.sections()}

    def flat(self) -> dict[str, Any]:
        """The resolved options of the sections that apply, in one dict."""
        return flat_config(self.to_dict())


def config_for_task(task: str, **options: Any) -> RunConfig:
    """A config for ``task`` with ``options`` set and every other option at its default."""
    return RunConfig(task=task, **options)


__all__ = [
    "SECTIONS",
    "RunConfig",
    "RunOptions",
    "TrainingOptions",
    "applicable",
    "config_for_task",
]
