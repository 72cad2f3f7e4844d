"""Families from other packages (the ``pyro_bll.families`` entry-point group), tested
without installing one: ``importlib.metadata.entry_points`` is replaced by a function
returning fake entry points whose ``load()`` gives a class (or fails)."""

import importlib.metadata
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch

from pyro_bll import FAMILIES, FamilyError, make_family
from pyro_bll.families import Family, FamilyPluginWarning, Poisson
from pyro_bll.families.plugins import GROUP
from pyro_bll.run.build import config_for_task, validate


@dataclass(repr=True)
class Shifted(Poisson):
    """A plugin family: a Poisson under another name, with a default of its own."""

    name = "toy_counts"
    min_rate: float = 0.25


class Incomplete(Family):
    """Not every abstract method implemented."""

    name = "incomplete"
    n_raw = n_feedback = 1


class ClashesWithABuiltin(Poisson):
    name = "gaussian"


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points(group=...)`` yields, as far as we use it."""

    def __init__(self, name, value, loaded=None, error=None):
        self.name, self.value, self.group = name, value, GROUP
        self.dist = type("Dist", (), {"name": f"{name}-package"})()
        self._loaded, self._error = loaded, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._loaded


@pytest.fixture
def plugins(monkeypatch):
    """Install fake entry points (``plugins(*eps)``) and reload the registry; the real
    entry points are read again afterwards."""

    def install(*eps):
        def entry_points(**kw):
            assert kw == {"group": GROUP}
            return list(eps)

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            FAMILIES.reload()
        return [str(w.message) for w in caught if issubclass(w.category, FamilyPluginWarning)]

    yield install
    monkeypatch.undo()
    FAMILIES.reload()


def test_a_plugin_family_is_registered_and_built_by_name(plugins):
    assert plugins(FakeEntryPoint("toy_counts", "toy_pkg:Shifted", Shifted)) == []
    assert FAMILIES["toy_counts"] is Shifted and "toy_counts" in FAMILIES.plugins
    assert "toy_counts" in sorted(FAMILIES)  # what --family's choices and the tests read
    fam = make_family("toy_counts")
    assert fam.min_rate == 0.25 and make_family("toy_counts", min_rate=1.0).min_rate == 1.0
    alpha = fam.params(torch.randn(3, 6))
    rho = fam.posterior(alpha, fam.feedback_potential(torch.randn(3, 6)))
    assert fam.kl(rho, alpha).shape == (3, 6)
    # the run configuration takes it as it takes a built-in (--family toy_counts)
    cfg = validate(config_for_task("s2s_reverse", family="toy_counts"))
    assert cfg.propagate == Shifted.default_propagate


def test_the_registry_forgets_the_plugin_when_it_is_gone(plugins):
    plugins(FakeEntryPoint("toy_counts", "toy_pkg:Shifted", Shifted))
    plugins()
    assert "toy_counts" not in FAMILIES
    with pytest.raises(FamilyError, match="unknown family 'toy_counts'"):
        make_family("toy_counts")


def test_a_plugin_that_fails_to_import_is_named_with_the_fix(plugins):
    error = ModuleNotFoundError("No module named 'toy_pkg'\nsecond line")
    warned = plugins(FakeEntryPoint("broken", "toy_pkg:Broken", error=error))
    assert len(warned) == 1
    assert "family plugin 'broken' (toy_pkg:Broken from package broken-package)" in warned[0]
    assert "failed to import" in warned[0] and "uninstall it" in warned[0]
    assert "\n" not in warned[0]
    assert "broken" not in FAMILIES and "gaussian" in FAMILIES  # the rest still load
    with pytest.raises(FamilyError) as e:
        make_family("broken")
    assert str(e.value) == warned[0]


@pytest.mark.parametrize(
    "loaded, problem",
    [
        (len, "not a subclass of pyro_bll.families.Family; point the entry point"),
        (Incomplete, "does not implement check_params, distribution"),
    ],
)
def test_a_plugin_that_is_not_a_usable_family_is_named_with_the_fix(plugins, loaded, problem):
    warned = plugins(FakeEntryPoint("odd", "toy_pkg:Odd", loaded))
    assert len(warned) == 1 and "family plugin 'odd'" in warned[0] and problem in warned[0]
    with pytest.raises(FamilyError, match="family plugin 'odd'"):
        make_family("odd")


def test_a_plugin_that_declares_params_propagation_without_coordinates_is_refused(plugins):
    class NoCoordinates(Incomplete):
        name = "no_coordinates"
        default_propagate = "params"

    for method in Incomplete.__abstractmethods__:
        setattr(NoCoordinates, method, lambda self, *a: None)
    NoCoordinates.__abstractmethods__ = frozenset()
    warned = plugins(FakeEntryPoint("no_coordinates", "toy_pkg:NoCoordinates", NoCoordinates))
    assert len(warned) == 1 and "needs an unconstrained() method" in warned[0]


def test_a_name_clash_keeps_the_builtin_and_warns(plugins):
    warned = plugins(FakeEntryPoint("gaussian", "toy_pkg:Clash", ClashesWithABuiltin))
    assert len(warned) == 1
    assert "the name of a built-in family" in warned[0] and "rename" in warned[0]
    assert FAMILIES["gaussian"] is not ClashesWithABuiltin
    assert make_family("gaussian").name == "gaussian"


def test_two_plugins_of_one_name_are_both_refused(plugins):
    class Other(Shifted):
        pass

    warned = plugins(
        FakeEntryPoint("toy_counts", "a:Shifted", Shifted),
        FakeEntryPoint("toy_counts", "b:Other", Other),
    )
    assert len(warned) == 1 and "are both named 'toy_counts'" in warned[0]
    with pytest.raises(FamilyError, match="both named 'toy_counts'"):
        make_family("toy_counts")


def test_unreadable_entry_points_only_warn(plugins, monkeypatch):
    def entry_points(**kw):
        raise OSError("bad metadata")

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.warns(FamilyPluginWarning, match="bad metadata"):
        FAMILIES.reload()
    assert "gaussian" in FAMILIES


def test_a_package_advertising_a_builtin_is_no_clash(plugins):
    assert plugins(FakeEntryPoint("gaussian", "pyro_bll.families:X", FAMILIES["gaussian"])) == []


def test_importing_pyro_bll_reads_no_entry_point():
    """Plugins are loaded on the registry's first use, not on ``import pyro_bll``: a
    plugin may import pyro_bll, and a broken one cannot break the import."""
    code = (
        "import importlib.metadata as m\n"
        "real = m.entry_points\n"
        "def boom(**kw):\n"
        "    if kw.get('group') == 'pyro_bll.families':\n"
        "        raise RuntimeError('read at import')\n"
        "    return real(**kw)\n"
        "m.entry_points = boom\n"
        "import pyro_bll\n"
        "print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr
