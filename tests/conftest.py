import os

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


import pytest


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    """Every test starts without the verdicts of verified stopping learnt by earlier tests (iterlayers.implicit)."""
    from iterlayers.implicit import VERDICTS

    VERDICTS.clear()
    yield
