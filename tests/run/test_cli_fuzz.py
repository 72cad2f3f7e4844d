"""Property-based test of experiments/run.py over combinations of options.

Every combination either trains one epoch on tiny data (exit 0, metrics written) or stops
with exit code 2 and one line starting with ``error:``; none raises or prints a traceback.
Hypothesis is derandomised and bounded, so the suite runs the same examples every time.
"""

import contextlib
import io
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vision_files import tiny_fashion_mnist

from pyro_bll.families import FAMILIES
from pyro_bll.guides import MESSAGES

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402

DATA = Path(tempfile.mkdtemp(prefix="pyro_bll_fuzz_")) / "fashion"
tiny_fashion_mnist(DATA, n_train=8, n_test=8)

BASE = {
    "s2s_reverse": ["--d-model", "8", "--seq-len", "4", "--train-size", "16", "--test-size",
                    "8", "--batch-size", "16"],
    "fashion_mnist_mlp": ["--d-model", "16", "--train-size", "8", "--test-size", "8",
                          "--batch-size", "8", "--data-dir", str(DATA)],
    "fashion_mnist": ["--width", "0.05", "--train-size", "8", "--test-size", "8",
                      "--batch-size", "8", "--data-dir", str(DATA)],
}  # fmt: skip
BAD = "no-such-name"
VALUES = {
    "--method": ["bll", "bp", "fa", "predsim", BAD],
    "--family": [*sorted(FAMILIES), BAD],
    "--likelihood": ["bound", "sample", BAD],
    "--propagate": ["mean", "params", "sample", BAD],
    "--message": [*sorted(MESSAGES), BAD],
    "--lr": ["0.001", "0", "-1", "nan", "fast"],
    "--batch-size": ["4", "0", "-3"],
    "--layers": ["2", "3", "4", "0"],
    "--blocks": ["1", "2", "3", "0", "-1"],
    "--bll-terms": ["kl,likelihood,pred", "pred", "kl,bogus"],
    "--checkpoint-every": ["1", "0", "-2"],
    "--feedback": ["linear", "mlp", BAD],
    "--feedback-update": ["grad", "solve"],
    "--lr-schedule": ["constant", "cosine", BAD],
    "--pred-weight": ["1", "-1"],
    "--pred-head": ["linear", "conv"],
    "--arch": ["resnet18", "resnet50", BAD],
    "--width": ["0.05", "0", "-1"],
    "--sim-weight": ["0.5", "2"],
    "--max-minutes": ["10", "0"],
    "--val-size": ["4", "100"],
    "--family-arg": ["sigma=0.5", "bogus=1", "sigma"],
    "--rank-blocks": ["1,1", "x"],
}
FLAGS = ["--amp", "--resume", "--distributed", "--no-augment", "--channels-last"]


@st.composite
def command_lines(draw) -> list[str]:
    task = draw(st.sampled_from(sorted(BASE)))
    options = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=5, unique=True))
    flags = draw(st.lists(st.sampled_from(FLAGS), max_size=1, unique=True))
    argv = ["--task", task, *BASE[task]]
    for opt in options:
        argv += [opt, draw(st.sampled_from(VALUES[opt]))]
    return [*argv, *flags]


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(argv=command_lines())
def test_every_combination_trains_or_exits_2_with_one_line(argv):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        full = [*argv, "--epochs", "1", "--threads", "1", "--no-progress", "--out", str(out)]
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run.cli(full)
        err = stderr.getvalue()
        assert "Traceback" not in err + stdout.getvalue(), full
        assert code in (0, 2), (full, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (full, err)
        else:
            assert (out / "metrics.json").exists(), full
