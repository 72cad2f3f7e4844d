import os

os.environ["PYRO_BLL_NO_ONEDNN"] = "1"  # before pyro_bll is imported; see pyro_bll/__init__.py

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pyro_bll import FAMILIES, make_family, seed_everything

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_state():
    """Fresh Pyro param store, validation on and a fixed seed for every test."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    seed_everything(0)
    yield
    pyro.clear_param_store()


# options that make a family fit the 6-channel latents used throughout the tests, as each
# family class declares them
TEST_OPTIONS = {name: dict(cls.example_options) for name, cls in FAMILIES.items()}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """Every registered family: the generic checks run on all of them."""
    return make_family(request.param, **TEST_OPTIONS.get(request.param, {}))
