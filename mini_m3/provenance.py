"""What a reported number was measured with (§7 evaluation, made repeatable): versions, command, commit, seed, kernels.

`provenance(seed)` is recorded in every results JSON (the demo's and each experiment's), and `fixed_numerics`
fixes what a CPU run's numbers depend on and can be fixed from inside the process: seeds, thread counts (torch's
and faiss's, whatever the machine's core count or OMP_NUM_THREADS), deterministic algorithms.

What cannot be fixed from inside is recorded instead. PyTorch picks its vectorised CPU kernels once per process
from the CPU (`cpu_capability`: AVX512 or AVX2 on x86, or the environment variable ATEN_CPU_CAPABILITY read at
start-up); the two round differently, so the same seed gives different losses from the first tens of steps on
(the demo's warmup ends at loss 1.1489 with AVX512, 1.1364 with AVX2) and a different training run after that.
Two runs print the same numbers when their `versions`, `cpu_capability`, threads and seed agree.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

# environment variables that change which kernels run or how many threads they use
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                "ONEDNN_MAX_CPU_ISA", "CUBLAS_WORKSPACE_CONFIG")
_REPO = Path(__file__).resolve().parents[1]


def package_versions() -> dict:
    """Versions of Python and of the packages the numbers depend on."""
    import faiss
    import safetensors
    import tokenizers
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "faiss": faiss.__version__, "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "--no-optional-locks", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout mini_m3 is imported from: ("unknown", None) when it is not a git checkout
    (an installed copy, even one inside some other repository, or no git), dirty = tracked files changed."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _REPO:
        return "unknown", None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return "unknown", None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(seed: int, *, argv: Sequence[str] | None = None) -> dict:
    """What to record beside a result so that it can be rerun and compared: seed, command line, commit, package
    versions, torch threads, CPU kernels, deterministic mode, the environment variables that change numerics."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"provenance: seed={seed!r} must be an integer")
    commit, dirty = git_commit()
    return {"seed": seed, "argv": list(sys.argv if argv is None else argv), "commit": commit, "dirty": dirty,
            "versions": package_versions(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def fixed_numerics(seed: int, threads: int) -> Iterator[None]:
    """Seeds, `threads` torch and faiss threads, deterministic algorithms; the previous threads and mode after."""
    import faiss
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} must be a positive integer")
    before = torch.get_num_threads(), faiss.omp_get_max_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    seed_everything(seed)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
        torch.use_deterministic_algorithms(before[2])
