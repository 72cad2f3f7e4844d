"""SIGINT / SIGTERM mid-epoch: a checkpoint, one line, exit 130 / 143, and an exact resume."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_bll.run.checkpoints import list_checkpoints
from pyro_bll.run.interrupt import TrainingInterrupted
from pyro_bll.run.progress import Progress
from pyro_bll.run.training import Trainer, prepare_out_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import run  # noqa: E402

# 5-token permutations: 120 in all, 16 held out; about 6 steps per epoch
TINY = ["--layers", "2", "--d-model", "16", "--seq-len", "5", "--train-size", "96",
        "--test-size", "16", "--batch-size", "16", "--threads", "1", "--no-progress"]  # fmt: skip


def _trainer(args: list[str], out: Path, *extra: str) -> Trainer:
    cfg, _ = run.parse_config([*args, "--out", str(out), *extra])
    from pyro_bll.run.build import validate

    validate(cfg)
    prepare_out_dir(cfg)
    return Trainer(cfg)


def _after_step(trainer: Trainer, at: int, action) -> None:
    """Run ``action`` once, right after optimiser step number ``at`` (1-based)."""
    step = trainer.step

    def wrapped(*a, **k):
        logs = step(*a, **k)
        if trainer.steps_done == at:
            action()
        return logs

    trainer.step = wrapped


def _same_run(a: Trainer, b: Trainer) -> None:
    sa, sb = a.chain.state_dict(), b.chain.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    timing = {"train_seconds", "eval_seconds"}
    strip = [{k: v for k, v in h.items() if k not in timing} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k not in timing} for h in b.history]
    assert a.steps_done == b.steps_done


@pytest.mark.parametrize("method", ["bll", "bp"])
def test_a_signal_mid_epoch_checkpoints_and_resume_is_exact(tmp_path, method):
    args = [*TINY, "--method", method, "--epochs", "3"]
    straight = _trainer(args, tmp_path / "straight")
    straight.fit(tmp_path / "straight", progress=False)
    per_epoch = straight.steps_done // 3
    at = per_epoch + 2  # inside the second epoch

    cut = _trainer(args, tmp_path / "cut")
    _after_step(cut, at, lambda: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(TrainingInterrupted) as info:
        cut.fit(tmp_path / "cut", progress=False)
    assert info.value.exit_code == 143
    assert info.value.checkpoint.name == "epoch_001_step_000002.pt"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = _trainer(args, tmp_path / "cut", "--resume")
    resumed.fit(tmp_path / "cut", progress=False)
    _same_run(straight, resumed)
    names = [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")]
    assert names == ["epoch_000.pt", "epoch_001.pt", "epoch_002.pt"]  # mid-epoch one done


def test_checkpoint_every_lets_a_crashed_run_resume_mid_epoch(tmp_path):
    args = [*TINY, "--epochs", "2"]
    straight = _trainer(args, tmp_path / "straight")
    straight.fit(tmp_path / "straight", progress=False)
    per_epoch = straight.steps_done // 2

    def crash():
        raise RuntimeError("power cut")

    crashed = _trainer(args, tmp_path / "crash", "--checkpoint-every", "2")
    _after_step(crashed, per_epoch + 3, crash)
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.fit(tmp_path / "crash", progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "crash" / "checkpoints")]
    assert names == ["epoch_000.pt", "epoch_001_step_000002.pt"]  # older mid-epoch ones go

    resumed = _trainer(args, tmp_path / "crash", "--resume")
    resumed.fit(tmp_path / "crash", progress=False)
    _same_run(straight, resumed)


@pytest.mark.parametrize("crash_after, newest", [(3, "epoch_001_step_000002.pt"),
                                                 (1, "epoch_000.pt")])  # fmt: skip
def test_delayed_targets_in_flight_survive_a_resume(tmp_path, crash_after, newest):
    """--beta target: the targets swept in the last d steps before a checkpoint (in the
    middle of an epoch, or at its end) arrive after the resume as they would have."""
    args = [*TINY, "--epochs", "2", "--beta", "target", "--target-delay", "2",
            "--checkpoint-every", "2"]  # fmt: skip
    straight = _trainer(args, tmp_path / "straight")
    straight.fit(tmp_path / "straight", progress=False)
    per_epoch = straight.steps_done // 2

    def crash():
        raise RuntimeError("power cut")

    crashed = _trainer(args, tmp_path / "crash")
    _after_step(crashed, per_epoch + crash_after, crash)
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.fit(tmp_path / "crash", progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "crash" / "checkpoints")]
    assert names[-1] == newest

    resumed = _trainer(args, tmp_path / "crash", "--resume")
    resumed.fit(tmp_path / "crash", progress=False)
    _same_run(straight, resumed)


def _start(out: Path) -> subprocess.Popen:
    """A run long enough to be interrupted, writing a mid-epoch checkpoint every 5 steps."""
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--layers", "2",
           "--d-model", "16", "--seq-len", "6", "--train-size", "100000", "--test-size", "16",
           "--batch-size", "16", "--threads", "1", "--checkpoint-every", "5",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_command_line_stops_on_a_signal_with_one_line(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _start(out)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("*_step_*.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr + stdout
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    assert last.startswith(f"interrupted by {name} at step ") and "resume with: python" in last
    assert last.endswith("--resume") and f"--out {out}" in last
    saved = Path(last.split("checkpoint ")[1].split(";")[0])
    assert saved.exists() and saved.parent == out / "checkpoints"


def test_progress_on_a_file_is_plain_lines_and_a_bar_on_a_terminal():
    log = io.StringIO()
    bar = Progress(range(1000), total=1000, desc="epoch 1/1", stream=log, every_seconds=1e9)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 9  # 10 %, 20 %, ... 90 %
    assert lines[0] == "epoch 1/1: step 100/1000 (10%) " + lines[0].split(") ")[1]
    assert lines[0].endswith("loss=99.0")  # the value set during step 100

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    assert list(Progress(range(50), total=50, desc="e", stream=tty)) == list(range(50))
    assert "\r" in tty.getvalue()  # tqdm's live bar


def test_a_run_log_holds_no_carriage_returns(tmp_path, capsys):
    assert run.cli([a for a in TINY if a != "--no-progress"] + ["--out", str(tmp_path / "r"),
                   "--epochs", "1"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out


def test_resume_command_swaps_overwrite_for_resume():
    line = run.resume_command(["--task", "s2s_reverse", "--overwrite", "--out", "a b"])
    assert line == "python experiments/run.py --task s2s_reverse --out 'a b' --resume"
    assert json.dumps(line)  # a plain string
