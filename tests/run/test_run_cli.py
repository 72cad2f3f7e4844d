"""Smoke, resume and bad-input tests of experiments/run.py on tiny configurations."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import run  # noqa: E402

from pyro_bll.run.options import RunConfig  # noqa: E402
from pyro_bll.run.training import Trainer, TrainingDiverged, main  # noqa: E402

TINY = [
    "--layers",
    "2",
    "--d-model",
    "16",
    "--seq-len",
    "4",
    "--train-size",
    "64",
    "--test-size",
    "16",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--no-progress",
]


def test_one_epoch_writes_every_artifact(tmp_path):
    out = tmp_path / "run"
    assert run.cli([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1
    assert 0 <= metrics["test_sequence_accuracy"] <= 1
    assert len(metrics["history"]) == 1
    assert len(metrics["history"][0]["block_losses"]) == 2
    terms = metrics["history"][0]["block_terms"]
    assert set(terms) == {"kl", "likelihood", "pred"} and all(len(v) == 2 for v in terms.values())
    total = [sum(t) for t in zip(*terms.values(), strict=True)]
    assert total == pytest.approx(metrics["history"][0]["block_losses"], rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["stack"]["layers"] == 2 and "vision" not in config  # resolved, applicable
    assert config["bll"]["likelihood"] == "sample"  # the Gaussian's own, not null
    assert (out / "checkpoints" / "epoch_000.pt").exists()
    png = (out / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.parametrize("method", ["bll", "bp"])
def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tmp_path, method):
    args = [*TINY, "--method", method]
    assert run.cli([*args, "--epochs", "3", "--out", str(tmp_path / "full")]) == 0
    assert run.cli([*args, "--epochs", "1", "--out", str(tmp_path / "part")]) == 0
    assert run.cli([*args, "--epochs", "3", "--out", str(tmp_path / "part"), "--resume"]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    part = json.loads((tmp_path / "part" / "metrics.json").read_text())
    for a, b in zip(full["history"], part["history"], strict=True):
        assert a["block_losses"] == pytest.approx(b["block_losses"], rel=1e-6)
        assert a["test_accuracy"] == b["test_accuracy"]
    sa = torch.load(tmp_path / "full" / "checkpoints" / "epoch_002.pt", weights_only=False)
    sb = torch.load(tmp_path / "part" / "checkpoints" / "epoch_002.pt", weights_only=False)
    for k, v in sa["model"].items():
        torch.testing.assert_close(v, sb["model"][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        ["--feedback", "mlp"],
        ["--feedback-update", "solve", "--ridge", "0.5", "--bll-terms", "kl,pred"],
        ["--propagate", "sample"],
        ["--propagate", "params", "--family", "gamma"],
        ["--likelihood", "sample", "--family", "bernoulli"],
        ["--family", "categorical", "--family-arg", "group_size=4"],
    ],
)
def test_options_run_end_to_end(tmp_path, extra):
    assert run.cli([*TINY, "--epochs", "1", "--out", str(tmp_path / "o"), *extra]) == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--family", "gaussian_learned", "--feedback-update", "solve"],
            "solve needs --family gaussian",
        ),
        (
            ["--family", "gaussian_gated", "--feedback-update", "solve"],
            "solve needs --family gaussian",
        ),
        (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
        (["--method", "bp", "--feedback-update", "solve"], "applies to --method bll only"),
        (
            ["--family", "categorical", "--family-arg", "group_size=5"],
            "group_size 5 does not divide the 16 channels",
        ),
        (["--feedback", "deep"], "invalid choice: 'deep'"),
        (["--task", "mnist"], "unknown task 'mnist'; valid: s2s_reverse"),
        (["--method", "sgd"], "unknown method 'sgd'; valid: bll, bp"),
        (["--family", "cauchy"], "unknown family 'cauchy'; valid: gaussian"),
        (["--layers", "4", "--blocks", "3"], "--blocks 3 must be positive and divide --layers 4"),
        (["--seq-len", "0"], "--seq-len must be positive"),
        (["--family-arg", "sigma=-1"], "sigma must be > 0"),
        (["--likelihood", "exact"], "invalid choice: 'exact' (choose from 'bound', 'sample')"),
        (["--method", "bp", "--likelihood", "sample"], "--likelihood applies to --method bll"),
        (
            ["--propagate", "logits"],
            "invalid choice: 'logits' (choose from 'mean', 'params', 'sample')",
        ),
        (
            ["--task", "fashion_mnist_mlp", "--propagate", "params"],
            "MLP blocks take mean or sample",
        ),
        (["--message", "everywhere"], "invalid choice: 'everywhere'"),
        # an option of a section that does not apply is refused by construction
        (["--split", "memory"], "--split applies to the vision tasks"),
        (["--sim-weight", "0.5"], "--sim-weight applies to --method predsim only"),
        (["--method", "bp", "--ridge", "2"], "--ridge applies to --method bll only"),
        (["--ridge", "2"], "--ridge applies to --feedback-update solve only"),
        (["--replicas", "2"], "--replicas applies to --distributed runs only"),
        (["--beta", "critic", "--distributed"], "--beta critic is not available with --distr"),
        (["--task", "fashion_mnist", "--layers", "3"], "--layers applies to the tasks with"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, argv, needle):
    tiny = TINY if "--task" not in argv else [a for a in TINY if a not in ("--seq-len", "4")]
    assert run.cli([*tiny, "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_existing_run_is_never_silently_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.cli([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    ckpt = out / "checkpoints" / "epoch_000.pt"
    before = ckpt.read_bytes()
    assert run.cli([*TINY, "--epochs", "1", "--out", str(out), "--seed", "5"]) == 2
    assert "already holds a run (epoch_001.pt)" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    assert run.cli([*TINY, "--epochs", "1", "--out", str(out), "--seed", "5", "--overwrite"]) == 0
    assert ckpt.read_bytes() != before
    # the overwritten run's later checkpoint is gone, so --resume continues the new run
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["epoch_000.pt"]


def test_resume_without_checkpoint_and_unwritable_out(tmp_path, capsys):
    assert run.cli([*TINY, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run.cli([*TINY, "--out", str(blocker / "sub")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "run.py"),
            "--family",
            "nope",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: unknown family 'nope'")
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for option in [
        "--task",
        "--method",
        "--family",
        "--layers",
        "--blocks",
        "--epochs",
        "--seed",
        "--out",
        "--device",
        "--resume",
    ]:
        assert option in help_text


def test_nan_loss_stops_with_block_and_epoch_and_keeps_results(tmp_path, monkeypatch):
    cfg, _ = run.parse_config([*TINY, "--epochs", "3", "--out", str(tmp_path / "nan")])
    main(cfg.replace(epochs=1), progress=False)
    original = Trainer.step

    def poisoned(self, x, y, mask):
        logs = original(self, x, y, mask)
        return {**logs, "loss": logs["loss"] * torch.tensor([1.0, float("nan")])}

    monkeypatch.setattr(Trainer, "step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"block 1 local loss is nan in epoch 2"):
        main(cfg.replace(resume=True), progress=False)
    metrics = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert len(metrics["history"]) == 1
    assert (tmp_path / "nan" / "checkpoints" / "epoch_000.pt").exists()


def test_the_parser_is_generated_from_the_sections():
    """Every option of every section is an option with help text, in its section's group;
    no option is declared twice; no dataclass of options holds more than 20 fields."""
    import dataclasses

    from pyro_bll.run.options import SECTIONS

    parser = run.build_parser()
    groups = {
        (g.title or "").split(";")[0]: {a.dest for a in g._group_actions}
        for g in parser._action_groups
    }
    for section in SECTIONS:
        assert len(section.options()) <= 20, section
        for f in section.options():
            assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help metadata"
            assert f.name in groups[section.title], f.name
    assert len(dataclasses.fields(RunConfig)) <= 20
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"given", "loaded"}
    assert {s.name for s in SECTIONS} == fields  # every section has its place
    flags = [s for a in parser._actions for s in a.option_strings]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize(
    "task, family, expected",
    [
        ("s2s_reverse", "bernoulli", "params"),  # bounded means: unconstrained parameters
        ("s2s_reverse", "gaussian", "mean"),  # the paper's
        ("fashion_mnist_mlp", "bernoulli", "mean"),  # MLP blocks read means only
    ],
)
def test_propagate_defaults_to_the_family_choice_where_the_task_allows_it(task, family, expected):
    from pyro_bll.run.build import validate

    cfg, _ = run.parse_config(["--task", task, "--family", family])
    assert validate(cfg).propagate == expected
    cfg, _ = run.parse_config(["--task", task, "--family", family, "--propagate", "sample"])
    assert validate(cfg).propagate == "sample"  # an explicit choice is kept


@pytest.mark.parametrize(
    "task, expected",
    [
        ("s2s_reverse", "gaussian"),
        ("fashion_mnist", "gaussian"),
        ("fashion_mnist_mlp", "gaussian_gated"),
    ],  # fmt: skip
)
def test_family_defaults_to_the_task_choice(task, expected):
    """--family unset: the paper's Gaussian, except where a task chose another on its
    validation split (the MLP); the family's own defaults (e.g. --propagate) follow it."""
    from pyro_bll.run.build import config_for_task, validate

    cfg, _ = run.parse_config(["--task", task])
    assert validate(cfg).family == expected
    assert config_for_task(task).family == expected
    cfg, _ = run.parse_config(["--task", task, "--family", "bernoulli"])
    assert validate(cfg).family == "bernoulli"  # an explicit choice is kept


def test_the_console_script_dispatches_its_commands(tmp_path, capsys):
    from pyro_bll.cli import main as console

    assert console(["--help"]) == 0 and "pyro-bll diagnose" in capsys.readouterr().out
    assert console([]) == 2 and "expected a command" in capsys.readouterr().err
    assert console(["run", *TINY, "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "metrics.json").exists()
    assert console(["diagnose", str(tmp_path / "r"), "--batch", "4", "--draws", "2",
                    "--last-only"]) == 0  # fmt: skip
    assert (tmp_path / "r" / "diagnostics" / "diagnostics.nc").exists()
