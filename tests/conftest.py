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
    yield
    torch.set_num_threads(1)  # a test that runs the CLI (default --threads 2) must not change the next test's


# ---- shared fixtures (module scope: built once per test file) ----------------------------------------
@pytest.fixture(scope="module")
def world():
    from mini_m3.data.world import World
    return World.generate(120, seed=0)


@pytest.fixture(scope="module")
def refs(world):
    """The world's reference texts (a test file may define its own `refs`)."""
    return world.references()


@pytest.fixture(scope="module")
def tok(world):
    from mini_m3 import Tokenizer
    return Tokenizer.train(world.tokenizer_corpus(), 512)


def shifted_chunk_loop(real, shift: float = 1e-2):
    """A per-chunk prefill loop made wrong by `shift` in every logit: the equality checks of the prefill benchmark
    and the GPU check must catch it."""
    def wrong(model, idx, memory, **kw):
        out = real(model, idx, memory, **kw)
        out.logits = out.logits + shift
        return out
    return wrong


def load_experiment(name: str):
    """The module of `experiments/{name}.py` (not a package; its own imports of `_common` need the folder on the path)."""
    import importlib.util
    import sys
    from pathlib import Path
    exp = Path(__file__).resolve().parents[1] / "experiments"
    sys.path.insert(0, str(exp))
    try:
        spec = importlib.util.spec_from_file_location(f"experiments_{name}", exp / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(exp))


def tiny_model(seed: int = 0, name: str = "tiny", **overrides):
    """A freshly initialised model in eval mode (same seed, same weights)."""
    from mini_m3 import Memory3, Memory3Config
    torch.manual_seed(seed)
    return Memory3(Memory3Config.from_name(name, **overrides)).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(0)
