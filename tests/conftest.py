import os

# One thread per test process: the suite runs under pytest-xdist on 2 cores, and oversubscribed
# OpenMP/BLAS threads make small ops orders of magnitude slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
