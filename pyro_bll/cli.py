"""The ``pyro-bll`` console script: ``pyro-bll run ...`` trains (the options of
``experiments/run.py``), ``pyro-bll diagnose RUN ...`` writes the agreement diagnostics
(the options of ``experiments/diagnose.py``)."""

from __future__ import annotations

import os
import sys

from pyro_bll.config import ConfigError
from pyro_bll.methods import METHODS
from pyro_bll.run.interrupt import TrainingInterrupted
from pyro_bll.run.options import RunConfig
from pyro_bll.run.parser import build_parser, parse_config, resume_command
from pyro_bll.run.training import TrainingDiverged, final_line
from pyro_bll.run.training import main as train_main


def run_cli(argv: list[str] | None = None) -> int:
    try:
        cfg, progress = parse_config(argv)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    except ConfigError as e:  # options resolved and refused (one line)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.distributed:  # this process is one rank of a torchrun job
        from pyro_bll.distributed.launch import main as distributed_main

        try:
            hint = "resume with: torchrun <the same launch options> " + resume_command(argv)
            hint = hint.replace(" python experiments/run.py", " experiments/run.py")
            code = distributed_main(cfg, progress=progress, resume_hint=hint)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if code or os.environ.get("RANK") != "0" or not build_parser().parse_args(argv).diagnostics:
            return code
        return _diagnostics(cfg)  # rank 0, from the checkpoint it assembled
    try:
        metrics = train_main(cfg, progress=progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: the checkpoint is written
        print(f"{e}; resume with: {resume_command(argv)}", file=sys.stderr, flush=True)
        return e.exit_code
    print(final_line(metrics, cfg.out))
    if build_parser().parse_args(argv).diagnostics:
        return _diagnostics(cfg)
    return 0


def _diagnostics(cfg: RunConfig) -> int:
    from pyro_bll.analysis.diagnostics import write_diagnostics

    try:
        path = write_diagnostics(cfg.out, device=cfg.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if METHODS[cfg.method].trains_feedback:
        print(f"diagnostics: {path}")
    else:
        print(f"diagnostics: {path} (forward draws z ~ alpha only: --method {cfg.method} "
              "trains no feedback network, so the agreement statistics are left out)")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``pyro-bll run|diagnose [options]``; ``pyro-bll run --help`` lists a command's options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"run": run_cli, "diagnose": _diagnose_cli}
    if not argv or argv[0] not in commands:
        if argv and argv[0] in ("-h", "--help"):
            print("usage: pyro-bll run [options]       train (pyro-bll run --help: every option)")
            print("       pyro-bll diagnose RUN_DIR... agreement diagnostics of trained runs")
            return 0
        print(f"error: expected a command, one of {', '.join(commands)} (see pyro-bll --help)",
              file=sys.stderr)  # fmt: skip
        return 2
    return commands[argv[0]](argv[1:])


def _diagnose_cli(argv: list[str]) -> int:
    from pyro_bll.analysis.cli import cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
