"""The vision tasks end to end through experiments/run.py on tiny files in the real formats."""

import json
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from vision_files import tiny_cifar10, tiny_fashion_mnist, write_idx

from pyro_bll.config import ConfigError
from pyro_bll.data import DEFAULT_CIFAR10, DEFAULT_FASHION_MNIST, load_fashion_mnist
from pyro_bll.data import cifar10 as cifar_module
from pyro_bll.families import make_family
from pyro_bll.run.build import config_for_task, validate
from pyro_bll.run.options import RunConfig
from pyro_bll.run.training import Trainer
from pyro_bll.tasks import TASKS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402
from common import finished_metrics  # noqa: E402

TINY = ["--width", "0.05", "--train-size", "8", "--test-size", "8", "--batch-size", "4",
        "--epochs", "1", "--threads", "1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "fashion_mnist": tiny_fashion_mnist(root / "fashion"),
        "cifar10": tiny_cifar10(root / "cifar"),
    }


def _args(data, task, out, *extra):
    return ["--task", task, "--data-dir", str(data[task]), *TINY, "--out", str(out), *extra]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("method", ["bp", "fa", "predsim", "bll"])
def test_one_epoch_of_every_method_and_arch_on_fashion_mnist(data, tmp_path, method, arch):
    out = tmp_path / "run"
    assert run.cli(_args(data, "fashion_mnist", out, "--method", method, "--arch", arch)) == 0
    m = _metrics(out)
    assert 0 <= m["test_accuracy"] <= 1 and m["epochs_done"] == 1
    assert m["config"]["network"]["blocks"] == 4 and m["config"]["vision"]["arch"] == arch
    assert m["config"]["images"]["data_dir"] == str(data["fashion_mnist"])
    assert "stack" not in m["config"] and "sequence" not in m["config"]  # sections that apply
    losses = m["history"][0]["block_losses"]
    assert len(losses) == (1 if method in ("bp", "fa") else 4)
    assert all(v == v for v in losses)  # finite numbers, no NaN
    assert (out / "checkpoints" / "epoch_000.pt").exists()


def test_the_mlp_takes_a_validation_split(data, tmp_path):
    """fashion_mnist_mlp --val-size N: the same hold-out as the vision tasks (the last N
    training images in the test set's place), reported as val_accuracy."""
    out = tmp_path / "mlp"
    argv = ["--task", "fashion_mnist_mlp", "--data-dir", str(data["fashion_mnist"]),
            "--d-model", "16", "--epochs", "1", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    assert run.cli([*argv, "--val-size", "6"]) == 0
    m = _metrics(out)
    assert "val_accuracy" in m["history"][0] and "test_accuracy" not in m["history"][0]
    task = TASKS["fashion_mnist_mlp"](RunConfig.from_dict(m["config"]))
    x_all, y_all = load_fashion_mnist(str(data["fashion_mnist"]), "train")  # 16 images
    assert task.x_train.shape[0] == 10 and torch.equal(task.y_test, y_all[10:])
    assert torch.equal(task.x_test, task._prep(x_all[10:]))
    assert run.cli([*argv, "--val-size", "16", "--overwrite"]) == 2  # nothing left to train


@pytest.mark.parametrize("method", ["predsim", "bll"])
def test_conv_predictive_heads_from_the_cli(data, tmp_path, method):
    out = tmp_path / "run"
    argv = _args(data, "fashion_mnist", out, "--method", method, "--pred-head", "conv")
    assert run.cli([*argv, "--pred-weight", "4"]) == 0
    m = _metrics(out)
    assert m["config"]["vision"]["pred_head"] == "conv"
    assert m["config"]["network"]["pred_weight"] == 4
    state = torch.load(out / "checkpoints" / "epoch_000.pt", weights_only=False)
    names = " ".join(_flat_keys(state))
    assert "pred_heads.0.conv.weight" in names and "pred_heads.2.read.linear.weight" in names


def test_val_size_holds_out_the_last_training_images(data, tmp_path, capsys):
    """--val-size N: train on the first images, evaluate (val_accuracy) on the last N
    training images; the test split plays no part."""
    out = tmp_path / "run"
    argv = _args(data, "fashion_mnist", out)
    i = argv.index("--train-size")
    del argv[i : i + 2]  # train on every image that is not held out
    assert run.cli([*argv, "--val-size", "6", "--test-size", "4"]) == 0
    m = _metrics(out)
    assert "val_accuracy" in m and "test_accuracy" not in m
    assert "val_accuracy" in m["history"][0] and "final val_accuracy" in capsys.readouterr().out
    task = TASKS["fashion_mnist"](RunConfig.from_dict(m["config"]))
    x_all, y_all = load_fashion_mnist(str(data["fashion_mnist"]), "train")  # 16 images
    assert task.data.x_train.shape[0] == 10 and task.data.x_test.shape[0] == 4  # --test-size
    assert torch.equal(task.data.x_test.cpu(), x_all[10:14].unsqueeze(-1))
    assert torch.equal(task.data.y_test.cpu(), y_all[10:14])
    assert torch.equal(task.data.x_train.cpu(), x_all[:10].unsqueeze(-1))


def _flat_keys(tree, prefix=""):
    """Every key path of nested dicts (a checkpoint's state dicts)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield f"{prefix}{k}"
            yield from _flat_keys(v, f"{prefix}{k}.")


def test_one_epoch_on_cifar10_with_flips_and_crops(data, tmp_path):
    out = tmp_path / "run"
    assert run.cli(_args(data, "cifar10", out, "--blocks", "2")) == 0
    m = _metrics(out)
    assert 0 <= m["test_accuracy"] <= 1 and len(m["history"][0]["block_losses"]) == 2
    task = TASKS["cifar10"](RunConfig.from_dict(m["config"]))
    assert task.data.x_train.shape == (8, 32, 32, 3) and len(task.data.y_test) == 8
    assert task.data.augmentation.flip and task.data.augmentation.crop_padding == 4


def test_task_defaults_and_explicit_options():
    cfg, _ = run.parse_config(["--task", "cifar10"])  # resolved once, the task's defaults
    assert (cfg.blocks, cfg.batch_size, cfg.lr, cfg.data_dir) == (4, 128, 4e-3, DEFAULT_CIFAR10)
    assert cfg.pred_weight == 4.0  # chosen on the validation split
    cfg, _ = run.parse_config(["--task", "fashion_mnist", "--batch-size", "7", "--lr", "0.1"])
    validate(cfg)
    assert (cfg.batch_size, cfg.lr, cfg.data_dir) == (7, 0.1, DEFAULT_FASHION_MNIST)
    with pytest.raises(ConfigError, match="--no-augment applies to the vision tasks"):
        run.parse_config(["--task", "fashion_mnist_mlp", "--no-augment"])
    cfg, _ = run.parse_config(["--task", "fashion_mnist_mlp"])
    assert (cfg.batch_size, cfg.data_dir, cfg.vision) == (100, DEFAULT_FASHION_MNIST, None)
    assert (cfg.layers, cfg.d_model, cfg.lr) == (3, 256, 1e-3)  # the MLP task's own network
    cfg, _ = run.parse_config([])
    validate(cfg)
    assert (cfg.task, cfg.blocks, cfg.batch_size, cfg.num_blocks) == ("s2s_reverse", None, 50, 20)
    for task in ("fashion_mnist", "fashion_mnist_mlp", "s2s_reverse"):  # one source of defaults
        direct = validate(RunConfig(task=task))
        from_cli, _ = run.parse_config(["--task", task])
        assert direct == validate(from_cli), task
    assert (direct.blocks, direct.images) == (None, None)  # s2s: one block per layer
    assert config_for_task("cifar10", blocks=2).blocks == 2


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data-dir", "MISSING"], "apt-get install dataset-fashion-mnist"),
        (["--data-dir", "CORRUPT"], "holds 6278 bytes, its header promises 6288 (truncated)"),
        (["--arch", "resnet34"], "invalid choice: 'resnet34'"),
        (["--method", "sgd"], "unknown method 'sgd'"),
        (["--blocks", "9"], "--blocks 9 exceeds the 8 residual units of resnet18"),
        (["--arch", "resnet50", "--blocks", "17"], "exceeds the 16 residual units of resnet50"),
        (["--amp"], "--amp (bf16 autocast) needs --device cuda"),
        (["--max-minutes", "0"], "--max-minutes must be positive"),
        (["--val-size", "16"], "--val-size 16 leaves no training images of the 16"),
        (["--val-size", "10"], "--train-size 8 overlaps the --val-size 10 held-out images"),
        (["--task", "s2s_reverse", "--val-size", "5"], "applies to the image tasks (--task"),
        (["--task", "cifar10", "--data-dir", "MISSING"], "nowhere does not exist; pass --data-dir"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(data, tmp_path, capsys, monkeypatch, extra, needle):
    corrupt = tmp_path / "corrupt"
    tiny_fashion_mnist(corrupt)
    path = write_idx(corrupt / "t10k-images-idx3-ubyte", torch.zeros(8, 28, 28).numpy())
    path.write_bytes(path.read_bytes()[:-10])

    def offline(directory):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar_module, "_download", offline)
    dirs = {"MISSING": str(tmp_path / "nowhere"), "CORRUPT": str(corrupt)}
    argv = [*_args(data, "fashion_mnist", tmp_path / "x"), *[dirs.get(a, a) for a in extra]]
    assert run.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("error: ")
    assert not (tmp_path / "x").exists()  # a refused run leaves nothing behind


def test_max_minutes_stops_after_the_epoch_that_uses_it_up(data, tmp_path):
    out = tmp_path / "budget"
    argv = _args(data, "fashion_mnist", out, "--epochs", "3", "--max-minutes", "1e-5")
    assert run.cli(argv) == 0
    m = _metrics(out)
    assert m["epochs_done"] == 1 and m["budget_exhausted"] is True
    assert m["elapsed_seconds"] >= 60 * 1e-5 and m["config"]["run"]["max_minutes"] == 1e-5
    h = m["history"][0]
    assert m["elapsed_seconds"] == pytest.approx(h["train_seconds"] + h["eval_seconds"])
    cfg, _ = run.parse_config(argv)
    assert finished_metrics(cfg) is not None  # benchmarks read a budget-stopped run back
    unlimited = _args(data, "fashion_mnist", tmp_path / "free", "--epochs", "2")
    assert run.cli(unlimited) == 0
    assert _metrics(tmp_path / "free")["epochs_done"] == 2
    assert _metrics(tmp_path / "free")["budget_exhausted"] is False


def test_resume_and_channels_last_reproduce_the_uninterrupted_run(data, tmp_path):
    args = _args(data, "fashion_mnist", tmp_path / "full", "--epochs", "2")
    assert run.cli(args) == 0
    # an interrupted run: the last checkpoint is lost, --resume redoes that epoch (the cosine
    # learning-rate schedule and its step count come back with the checkpoint)
    part = _args(data, "fashion_mnist", tmp_path / "part", "--epochs", "2")
    assert run.cli(part) == 0
    (tmp_path / "part" / "checkpoints" / "epoch_001.pt").unlink()
    assert run.cli([*part, "--resume"]) == 0
    cl = _args(data, "fashion_mnist", tmp_path / "cl", "--epochs", "2", "--channels-last")
    assert run.cli(cl) == 0
    full = _metrics(tmp_path / "full")["history"]
    for other in ("part", "cl"):
        for a, b in zip(full, _metrics(tmp_path / other)["history"], strict=True):
            assert a["block_losses"] == pytest.approx(b["block_losses"], rel=1e-4)
            assert a["test_accuracy"] == b["test_accuracy"]
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "epoch_001.pt", weights_only=False)
    assert "cuda" in ckpt["rng"]


@pytest.mark.parametrize("method", ["bll", "bp"])
def test_amp_autocasts_the_step_to_bf16(data, tmp_path, method):
    """The --amp code path, run with CPU bf16 autocast (the option itself needs CUDA)."""
    cfg, _ = run.parse_config(_args(data, "fashion_mnist", tmp_path / "amp", "--method", method))
    trainer = Trainer(cfg)
    trainer.amp = True
    x, y, mask = next(iter(trainer.task.train_batches(0)))
    with trainer.autocast():
        assert trainer.chain.blocks[0](x).dtype == torch.bfloat16
    before = [p.detach().clone() for p in trainer.chain.parameters()]
    logs = trainer.step(x, y, mask)
    assert torch.isfinite(logs["loss"]).all()
    after = list(trainer.chain.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert 0 <= trainer.task.evaluate(trainer.chain, trainer.device)["test_accuracy"] <= 1


def _task(name, data, tmp_path):
    fashion = str(tiny_fashion_mnist(tmp_path / "f")) if name == "fashion_mnist_mlp" else None
    own = {"s2s_reverse": {"layers": 2, "d_model": 8, "seq_len": 4},
           "fashion_mnist_mlp": {"layers": 2, "d_model": 8, "data_dir": fashion}}.get(
        name, {"width": 0.05, "data_dir": str(data.get(name, ""))})  # fmt: skip
    cfg = config_for_task(name, train_size=8, test_size=6, **own)
    return TASKS[name](cfg)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_diagnostic_batch_of_every_task(data, tmp_path, name):
    task = _task(name, data, tmp_path)
    x, y, mask = task.diagnostic_batch(5)
    assert len(x) == len(y) == 5 and (mask is None or mask.shape == y.shape)
    chain = task.build_chain(make_family("gaussian"))
    chain.eval()
    with torch.no_grad():
        logits = chain.predict_logits(x)
    assert logits.shape[:-1] == y.shape
    assert len(task.diagnostic_batch(100)[1]) == 6  # capped at the test set


def test_reproduce_table1_bad_input_is_one_line(tmp_path, capsys):
    import reproduce_table1

    base = ["--width", "0.05", "--runs-dir", str(tmp_path / "r"), "--results", str(tmp_path)]
    assert reproduce_table1.main([*base, "--fashion-dir", str(tmp_path / "none")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert reproduce_table1.main([*base, "--blocks", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --blocks 9 exceeds the 8 residual units of resnet18; use 1..8"
    assert not (tmp_path / "table1.md").exists()
