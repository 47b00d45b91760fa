"""Shared helpers for the benchmark scripts: arguments, seeding, machine description, timing, output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from mini_m3.provenance import git_commit, provenance, seed_everything
from mini_m3.utils import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
# (commit, dirty) of the mini_m3 checkout when the script started: the code it imported. A result records this, not
# the checkout when it writes (a commit landing during a long run would otherwise be named as the code that ran)
STARTED_AT = git_commit()


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps a docstring description's layout and shows each flag's default (argparse allows both)."""


def parse_args(name: str, argv: Sequence[str] | None, doc: str, extra: Callable | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run of the same code")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"),
                   help="JSON output (a script that plots writes its PNG next to it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the random generators (seed_everything); most scripts also draw their data with it")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (and faiss where the script uses it)")
    if extra is not None:
        extra(p)
    return p.parse_args(list(argv) if argv is not None else None)


def seed_all(seed: int) -> None:
    seed_everything(seed)


def machine(threads: int | None = None) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "loadavg_1_5_15": list(os.getloadavg()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def median(xs):
    return float(statistics.median(xs))


def timeit(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def write_json(out: str | os.PathLike, obj: dict, *, seed: int) -> Path:
    """Write `obj` with its provenance (versions, argv, commit and dirty flag at start, seed, threads, CPU kernels;
    added to `obj` itself, so what the script returns is what it wrote)."""
    obj["provenance"] = {**provenance(seed), "commit": STARTED_AT[0], "dirty": STARTED_AT[1]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(obj, indent=1, default=float))
    return out


def png_path(out: str | os.PathLike) -> Path:
    return Path(out).with_suffix(".png")


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt_
    return plt_


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt().close(fig)
