"""Every task's default run learns: ``run.py --task NAME`` with nothing else (here on tiny
generated data files where the task reads files) lowers its loss within a few steps.

The configuration comes from the command-line parser, so these are the defaults a user
gets; only the data location, the training-set size and the thread count are set.
"""

import sys
from pathlib import Path

import pytest
import torch

from pyro_bll.run.build import validate
from pyro_bll.run.training import Trainer
from pyro_bll.tasks import TASKS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from run import parse_config  # noqa: E402
from vision_files import tiny_cifar10, tiny_fashion_mnist  # noqa: E402

STEPS = 12


def _data_dir(task: str, tmp_path: Path) -> list[str]:
    if task in ("fashion_mnist", "fashion_mnist_mlp"):
        return ["--data-dir", str(tiny_fashion_mnist(tmp_path / "fashion", 64, 16))]
    if task == "cifar10":
        return ["--data-dir", str(tiny_cifar10(tmp_path / "cifar", per_batch=12))]
    return []


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_default_run_lowers_its_loss(task, tmp_path):
    argv = ["--task", task, "--threads", "1", "--out", str(tmp_path / "run"),
            *_data_dir(task, tmp_path)]  # fmt: skip
    cfg, _ = parse_config(argv)
    validate(cfg)
    if task != "s2s_reverse":
        cfg = cfg.replace(batch_size=min(cfg.batch_size, 16))  # tiny files; a ResNet on 1 thread
    trainer = Trainer(cfg)
    batch = next(iter(trainer.task.train_batches(0)))
    x, y, mask = (None if t is None else t.to(trainer.device) for t in batch)
    steps = STEPS if task in ("s2s_reverse", "fashion_mnist_mlp") else 6
    losses = [trainer.step(x, y, mask)["loss"].sum().item() for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_family_and_method_defaults_agree_between_python_and_the_command_line():
    """--propagate follows the family on s2s_reverse and --backward the method, whether
    the config comes from config_for_task or from the parser."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import run

    from pyro_bll.families import FAMILIES
    from pyro_bll.methods import METHODS
    from pyro_bll.run.build import config_for_task, validate

    for family, cls in FAMILIES.items():
        for method in ("bll", "bp"):
            py = validate(config_for_task("s2s_reverse", family=family, method=method))
            cli, _ = run.parse_config(["--family", family, "--method", method])
            cli = validate(cli)
            assert py.propagate == cli.propagate == cls.default_propagate, family
            assert py.backward == cli.backward == "joint"  # s2s_reverse: joint for all
    for method in METHODS:
        py = validate(config_for_task("cifar10", method=method))
        cli, _ = run.parse_config(["--task", "cifar10", "--method", method])
        expected = "per-block" if METHODS[method].local else "joint"
        assert py.backward == validate(cli).backward == expected
