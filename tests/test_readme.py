"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "'block': 0" in out


def test_the_own_model_page_runs_in_order(capsys):
    """docs/own_model.md: every python block, in order, in one namespace."""
    page = README.parent / "docs" / "own_model.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace = {"__name__": "own_model"}
    for code in blocks:
        exec(compile(code, "docs/own_model.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "vote accuracy" in out and "bll_chain_2_gaussian" in out
    probs = namespace["torch"].sigmoid(namespace["pyro"].param("coin_logits")).detach()
    assert (probs[[1, 2]] > 0.7).all() and (probs[[0, 3]] < 0.3).all()  # learnt the coins
