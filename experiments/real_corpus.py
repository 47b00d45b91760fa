"""§4.3-§4.4 and §3.4 on real text (issue 18 part 2): does explicit memory lower held-out loss on Debian's man pages?

A corpus no one here wrote and that a fresh machine gets offline (`apt-get install manpages manpages-dev man-db`):
the English manual pages of sections 2, 3, 5 and 7, rendered to plain UTF-8 text by `man -l`. Then, per seed, the
commands a user runs (paper_notes/own_data.md, "Your own corpus"), in this process through `mini_m3.cli.main`:

    mini-m3 train --text-dir CORPUS --out SEED_DIR --control --eval-every N ...     (tokenizer: training split only)
    mini-m3 build-bank --model SEED_DIR/best_model --text-dir CORPUS --out SEED_DIR/bank_without
    mini-m3 build-bank ... --heldout-references --out SEED_DIR/bank_with          (held-out knowledge "added later")
    mini-m3 evaluate --model SEED_DIR/best_model --bank BANK --text-dir SEED_DIR \
        --control-model SEED_DIR/control_best_model                                (for both banks)

and one JSON with the held-out loss of memory / none / rag / control per seed and mean/min/max over seeds, the
verdict of issue 18 (memory below memory-off and below the control by more than the seeds' spread, or by how much
it is not), and a PNG.

    python experiments/real_corpus.py [--quick] [--seeds 0 1 2] [--threads 1]
    python experiments/real_corpus.py --prepare-only          # only the corpus (WORK/corpus, manifest.json)

A seed whose results exist with the same settings is not rerun: run `--seeds 0`, `--seeds 1`, `--seeds 2` as three
processes, then the plain command collects them.
"""

from __future__ import annotations

import argparse
import bz2
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, plt as pyplot, png_path, save_figure, write_json  # noqa: E402

from mini_m3.utils import atomic_write_text  # noqa: E402

MAN_ROOT = "/usr/share/man"
SECTIONS = ("2", "3", "5", "7")
PACKAGES = ("manpages", "manpages-dev")
INSTALL = "apt-get install manpages manpages-dev man-db"
MODES = ("memory", "none", "rag", "control")
BANKS = ("without", "with")  # the bank without / with the held-out documents' references
MANIFEST = "manifest.json"
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


# ---- the corpus ---------------------------------------------------------------------------------------------

def find_pages(root: Path, sections) -> list[Path]:
    """The page files of ROOT/man<section>/ (English: the translated trees ROOT/<lang>/ are not read), sorted."""
    pages = []
    for s in sections:
        d = root / f"man{s}"
        if d.is_dir():
            pages += [p for p in d.iterdir() if re.fullmatch(rf"[^/]+\.{re.escape(s)}[a-z]*(\.(gz|bz2|xz))?", p.name)
                      and (p.is_file() or p.is_symlink())]
    return sorted(pages, key=lambda p: p.relative_to(root).as_posix())


def page_name(path: Path) -> str:
    """`open.2` for man2/open.2.gz."""
    return path.name[:-len(path.suffix)] if path.suffix in OPENERS else path.name


def alias_of(path: Path) -> str | None:
    """The page a symlink or a `.so` stub stands for (rendering it would duplicate that page), else None."""
    if path.is_symlink():
        return os.readlink(path)
    try:
        with OPENERS.get(path.suffix, open)(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except (OSError, EOFError, lzma.LZMAError):
        return None  # unreadable: `man` says why when it renders it
    for line in head.splitlines():
        if line.strip() and not re.match(r"^[.']\\\"", line):  # the first line that is not a comment
            return line.split(None, 1)[1].strip() if line.startswith(".so ") and " " in line.strip() else None
    return None


def dpkg(*args: str) -> subprocess.CompletedProcess | None:
    """`dpkg-query ARGS` (None without dpkg-query: not a Debian system)."""
    if shutil.which("dpkg-query") is None:
        return None
    return subprocess.run(["dpkg-query", *args], capture_output=True, text=True, errors="replace")


def package_files(packages) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """{real path: package} of the files of the installed `packages`, {package: version}, packages not installed."""
    owner, versions, missing = {}, {}, []
    for pkg in packages:
        r = dpkg("-W", "-f", "${Status}\t${Version}", pkg)
        if r is None:
            raise ValueError("dpkg-query not found (not a Debian system?): pass --packages with no names to take "
                             "every page under --man-root")
        status, _, version = r.stdout.partition("\t")
        if r.returncode or not status.endswith(" installed"):
            missing.append(pkg)
            continue
        versions[pkg] = version
        for f in dpkg("-L", pkg).stdout.splitlines():
            owner[os.path.realpath(f)] = pkg
    return owner, versions, missing


def owners(paths: list[Path]) -> dict[str, str]:
    """{real path: package} by `dpkg-query -S` (one call; paths no package owns are left out)."""
    r = dpkg("-S", *(str(p) for p in paths)) if paths else None
    found = {}
    for line in (r.stdout.splitlines() if r is not None else []):
        pkg, sep, path = line.partition(": ")
        if sep and "," not in pkg and not pkg.startswith("diversion"):
            found[os.path.realpath(path)] = pkg.split(":")[0]
    return found


def renderer() -> str:
    """The versions of man-db and groff (they decide the text); a clear error without `man`."""
    if shutil.which("man") is None:
        raise ValueError(f"`man` not found: {INSTALL}")
    versions = []
    for cmd in (["man", "--version"], ["groff", "--version"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, errors="replace").stdout
        except OSError:
            out = ""
        versions.append(out.splitlines()[0].strip() if out.strip() else f"{cmd[0]}: unknown")
    return "; ".join(versions)


_OVERSTRIKE = re.compile(r".\x08")  # x BS x (bold), _ BS x (underline): the terminal's overstrikes
_SGR = re.compile(r"\x1b\[[0-9;]*m")  # colour/bold escape sequences


CLEAN_VERSION = 2  # 2: headers squeezed by a long page name are removed too (a corpus cleaned by 1 is redone)


def clean(text: str) -> str:
    """Rendered page -> plain text: no overstrikes or escapes, no running header/footer, the 7-column body indent
    and trailing spaces removed, runs of blank lines as one."""
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    lines = [line.rstrip() for line in _SGR.sub("", text).splitlines()]
    body = [i for i, line in enumerate(lines) if line]
    if len(body) >= 2:  # "open(2)   System Calls Manual   open(2)" ... "Linux man-pages 6.03  2023-02-05  open(2)"
        # A long name squeezes the header into one run ("pthread_attr_setstacksize(3Library Functions
        # Manuapthread_attr_setstacksize(3)"), so the header need only *end* with the footer's "name(section)".
        footer = lines[body[-1]].split()[-1]
        if re.fullmatch(r"\S+\(\S+\)", footer) and lines[body[0]].endswith(footer):
            lines[body[0]] = lines[body[-1]] = ""
    lines = [line[min(7, len(line) - len(line.lstrip(" "))):] for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def render(path: Path, root: Path, width: int = 80, timeout: float = 60.0) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not): `man -l` without hyphenation or justification, in ROOT (where `.so`
    requests are resolved), UTF-8, WIDTH columns."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": str(width), "MANPAGER": "cat", "PAGER": "cat"}
    env.pop("MAN_KEEP_FORMATTING", None)
    try:
        r = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], cwd=root, env=env, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"render failed: timed out after {timeout:g} s"
    err = " | ".join(line.strip() for line in r.stderr.decode("utf-8", "replace").splitlines() if line.strip())
    if r.returncode:
        return None, f"render failed: man exit {r.returncode}: {err[:300]}"
    try:
        text = clean(r.stdout.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"render failed: text is not UTF-8: {e}"
    if not text.strip():
        return None, "empty: renders to no text" + (f" ({err[:300]})" if err else "")
    return text, None


def file_name(name: str) -> str:
    """A page name as a portable .txt file name (`open.2.txt`; other characters than [A-Za-z0-9._+-] as _)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) + ".txt"


def order_key(path: Path) -> str:
    """A fixed pseudo-random order of the pages (a hash of man<section>/<name>): a budget takes a spread of
    sections and names, and the same pages on every machine with the same pages installed."""
    return hashlib.sha256(f"real_corpus:{path.parent.name}/{page_name(path)}".encode()).hexdigest()


def corpus_sha256(pages: list[dict]) -> str:
    return hashlib.sha256("".join(f"{p['file']}\t{p['sha256']}\n" for p in pages).encode()).hexdigest()


def prepare_settings(a) -> dict:
    """What the corpus depends on (a corpus prepared with other settings is prepared again)."""
    root, packages, versions = Path(a.man_root).resolve(), list(a.packages), renderer()  # `man` first
    _, package_versions, missing = package_files(packages) if packages else ({}, {}, [])
    return {"man_root": str(root), "sections": list(a.sections), "packages": packages,
            "package_versions": package_versions, "packages_not_installed": missing, "max_docs": a.max_docs,
            "max_bytes": a.max_bytes, "max_page_bytes": a.max_page_bytes, "width": 80, "renderer": versions,
            "render_command": "LC_ALL=C.UTF-8 MANWIDTH=80 man --nh --nj -l PAGE (then experiments/real_corpus.clean)",
            "clean_version": CLEAN_VERSION}


def existing_corpus(corpus: Path, settings: dict) -> dict | None:
    """The manifest of a corpus prepared with `settings` whose files are all there, unchanged; else None."""
    try:
        m = json.loads((corpus / MANIFEST).read_text(encoding="utf-8"))
        if m["settings"] != settings:
            return None
        for p in m["pages"]:
            if hashlib.sha256((corpus / p["file"]).read_bytes()).hexdigest() != p["sha256"]:
                return None
        return m
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(work: Path, a, log=print) -> tuple[Path, dict]:
    """WORK/corpus: one .txt per kept page and manifest.json (found, kept, skipped and why, per page: source,
    package, version, bytes, sha256). Reused when prepared before with the same settings; written whole or not at
    all (rendered in a temporary folder, then renamed); a lock keeps parallel runs from preparing it twice."""
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    with open(work / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        settings = prepare_settings(a)
        if (m := existing_corpus(corpus, settings)) is not None:
            log(f"corpus: {m['kept']} pages, {m['bytes']} bytes in {corpus} (prepared before)")
            return corpus, m
        m = build_corpus(corpus, settings)
        log(f"corpus: {m['kept']} of {m['found']} pages, {m['bytes']} bytes in {corpus} ({m['skipped_by_reason']})")
        return corpus, m


def build_corpus(corpus: Path, settings: dict) -> dict:
    """Render the selected pages, in a fixed order, until a cap; see `prepare`."""
    root, sections = Path(settings["man_root"]), settings["sections"]
    found = find_pages(root, sections)
    where = f"sections {' '.join(sections)} (man{sections[0]}/ ...) under {root}"
    if settings["packages"]:
        where += f" of the packages {' '.join(settings['packages'])}"
        if settings["packages_not_installed"]:
            where += f" (not installed: {' '.join(settings['packages_not_installed'])})"
    if not found:
        raise ValueError(f"no manual pages found in {where}: install them with `{INSTALL}`")
    owner, _, _ = package_files(settings["packages"]) if settings["packages"] else ({}, {}, [])
    skipped, candidates = [], []
    for p in found:
        if settings["packages"] and os.path.realpath(p) not in owner:
            skipped.append({"source": str(p), "reason": "not in --packages"})
        elif (target := alias_of(p)) is not None:
            skipped.append({"source": str(p), "reason": f"alias: of {target}"})
        else:
            candidates.append(p)
    if not candidates:
        raise ValueError(f"no manual pages found in {where} ({len(found)} files, none a page of its own): install "
                         f"them with `{INSTALL}`")
    candidates.sort(key=order_key)
    tmp = Path(tempfile.mkdtemp(dir=corpus.parent, prefix=".corpus-tmp-"))
    try:
        pages, total, over_budget, t0 = [], 0, 0, time.perf_counter()
        for i, p in enumerate(candidates):
            if len(pages) >= settings["max_docs"] or total >= settings["max_bytes"]:
                over_budget = len(candidates) - i
                break
            text, why = render(p, root)
            data = text.encode("utf-8") if text is not None else b""
            if why is None and len(data) > settings["max_page_bytes"]:
                why = f"over --max-page-bytes: {len(data)} bytes rendered, more than {settings['max_page_bytes']}"
            if why is not None:
                skipped.append({"source": str(p), "reason": why})
                continue
            name = file_name(page_name(p))
            if (tmp / name).exists():  # open.2 and open.2.gz: the first in the fixed order
                skipped.append({"source": str(p), "reason": f"duplicate: a second file of page {page_name(p)}"})
                continue
            (tmp / name).write_bytes(data)
            total += len(data)
            pages.append({"file": name, "source": str(p), "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
        if not pages:
            raise ValueError(f"none of the {len(candidates)} manual pages in {where} rendered to text (last: "
                             f"{skipped[-1]['source']}: {skipped[-1]['reason']})")
        where_from = owner if settings["packages"] else owners([Path(p["source"]) for p in pages])
        versions = dict(settings["package_versions"])
        for p in pages:
            p["package"] = pkg = where_from.get(os.path.realpath(p["source"]))
            if pkg is not None and pkg not in versions:
                r = dpkg("-W", "-f", "${Version}", pkg)
                versions[pkg] = r.stdout.strip() if r is not None and not r.returncode else None
            p["version"] = versions.get(pkg)
        reasons: dict[str, int] = {}
        for s in skipped:  # reasons are "kind: detail"
            kind = s["reason"].split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        if over_budget:
            reasons["not rendered: --max-docs/--max-bytes reached"] = over_budget
        m = {"settings": settings, "found": len(found), "kept": len(pages), "skipped": len(skipped) + over_budget,
             "skipped_by_reason": reasons, "bytes": total, "corpus_sha256": corpus_sha256(pages),
             "render_seconds": round(time.perf_counter() - t0, 2), "pages": pages, "skipped_pages": skipped}
        atomic_write_text(tmp / MANIFEST, json.dumps(m, indent=1, ensure_ascii=False))
        old = None
        if corpus.exists():
            old = Path(tempfile.mkdtemp(dir=corpus.parent, prefix=".corpus-old-"))
            corpus.rename(old / "corpus")
        tmp.rename(corpus)
        if old is not None:
            shutil.rmtree(old)
        return m
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---- the user's commands, per seed ----------------------------------------------------------------------------

def mini_m3(args: list, log=print) -> None:
    """Run one `mini-m3` command in this process (what a user types, printed first); a failure is an error."""
    from mini_m3.cli import main as cli_main
    argv = [str(x) for x in args]
    log("$ mini-m3 " + " ".join(argv))
    code = cli_main(argv)
    if code:
        raise ValueError(f"`mini-m3 {argv[0]}` exited with {code}: its error is printed above")


def seed_settings(a, corpus_sha: str) -> dict:
    """What a seed's results depend on (not --threads: the same run on other threads is the same experiment)."""
    return {"corpus_sha256": corpus_sha, "preset": a.preset, "vocab_size": a.vocab_size,
            "chunks_per_sequence": a.chunks_per_sequence, "batch_size": a.batch_size,
            "warmup_steps": a.warmup_steps, "continual_steps": a.continual_steps, "eval_every": a.eval_every,
            "heldout_fraction": a.heldout_fraction, "reference_fraction": a.reference_fraction,
            **({"set": a.set} if a.set else {})}  # absent when empty: seeds run before --set existed stay valid


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def run_seed(a, corpus: Path, corpus_sha: str, seed: int, work: Path, log=print) -> dict:
    """train (memory and control), build-bank without and with the held-out references, evaluate against both at
    the best checkpoints; returns (and writes to SEED_DIR/result.json) the seed's numbers. A seed done before with
    the same settings is read back, not rerun; one begun with other settings is started afresh."""
    run = work / f"seed{seed}"
    settings = seed_settings(a, corpus_sha)
    done, marker = run / "result.json", run / "settings.json"
    if done.is_file() and (r := read_json(done)).get("settings") == settings:
        log(f"seed {seed}: results of {run} reused (same settings)")
        return r
    if marker.is_file() and read_json(marker) != settings:
        log(f"seed {seed}: {run} was run with other settings: starting it afresh")
        shutil.rmtree(run)
    elif run.exists() and not marker.is_file() and any(run.iterdir()):
        raise ValueError(f"{run} exists and was not made by this script (no settings.json): move it aside")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(settings, indent=1))
    common = ["--seed", seed, "--threads", a.threads, "--heldout-fraction", a.heldout_fraction,
              "--reference-fraction", a.reference_fraction] + (["--quiet"] if a.quiet else [])
    seconds, t = {}, time.perf_counter()
    mini_m3(["train", "--text-dir", corpus, "--out", run, "--preset", a.preset, "--vocab-size", a.vocab_size,
             "--chunks-per-sequence", a.chunks_per_sequence, "--batch-size", a.batch_size,
             "--warmup-steps", a.warmup_steps, "--continual-steps", a.continual_steps,
             "--checkpoint-every", a.eval_every, "--eval-every", a.eval_every, "--control",
             *(["--set", *a.set] if a.set else []), *common], log)
    seconds["train"] = time.perf_counter() - t
    # the best checkpoints by held-out loss (README: `best_model`, `control_best_model`); the final ones if none
    models = {n: run / n if (run / n).is_dir() else run / final
              for n, final in (("best_model", "model"), ("control_best_model", "control_model"))}
    r = {"seed": seed, "settings": settings, "run": str(run), "models": {k: str(v) for k, v in models.items()},
         "best": read_json(run / "best.json") if (run / "best.json").is_file() else None,
         "pipeline": {k: read_json(run / "data" / "report.json")[k] for k in
                      ("kept", "training_documents", "heldout_documents", "reference_documents", "tokens_train")},
         "banks": {}}
    for bank in BANKS:
        t = time.perf_counter()
        mini_m3(["build-bank", "--model", models["best_model"], "--text-dir", corpus, "--out", run / f"bank_{bank}",
                 "--overwrite", *(["--heldout-references"] if bank == "with" else []), *common], log)
        seconds[f"build_bank_{bank}"] = time.perf_counter() - t
        t = time.perf_counter()
        out = run / f"heldout_{bank}.json"
        mini_m3(["evaluate", "--model", models["best_model"], "--bank", run / f"bank_{bank}", "--text-dir", run,
                 "--control-model", models["control_best_model"], "--out", out, *common], log)
        seconds[f"evaluate_{bank}"] = time.perf_counter() - t
        e = read_json(out)
        r["banks"][bank] = {"overall": e["overall"], "retrieval": e["retrieval"], "evaluation": str(out),
                            "heldout_documents": e["heldout_documents"],
                            "bank_holds_heldout_references": e["bank_holds_heldout_references"]}
    r["seconds"] = {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(sum(seconds.values()), 1)}
    atomic_write_text(done, json.dumps(r, indent=1))
    log(f"seed {seed}: {r['seconds']['total']:.0f} s; " + "; ".join(
        f"bank {b}: " + ", ".join(f"{m} {v['loss']:.4f}" for m, v in r["banks"][b]["overall"].items())
        for b in BANKS))
    return r


# ---- over seeds ---------------------------------------------------------------------------------------------

def spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}


def verdict(losses: dict[str, list[float]], other: str) -> dict:
    """Is memory below `other` (none or control) by more than the seeds' spread? Paired per seed (each seed holds out
    other documents, so the losses themselves move with the split): the gap is other - memory per seed, and memory
    wins when the mean gap exceeds the gaps' spread over seeds (max - min; then every seed's gap is > 0). The
    losses' own spread (the larger max - min of the two) is reported beside it, for the stricter reading."""
    gaps = [o - m for o, m in zip(losses[other], losses["memory"])]
    mean, width = statistics.fmean(gaps), max(gaps) - min(gaps)
    loss_width = max(max(xs) - min(xs) for xs in (losses["memory"], losses[other]))
    n = len(gaps)
    holds = n >= 2 and min(gaps) > 0 and mean > width
    seen = f"gap {mean:+.4f} nats (mean of {n} seeds, min {min(gaps):+.4f}, max {max(gaps):+.4f})"
    if n < 2:
        text = f"memory vs {other}: gap {mean:+.4f} nats on one seed: no spread to compare it with (run 3 seeds)"
    elif holds:
        text = f"memory is below {other}: {seen}, more than the gaps' spread {width:.4f}"
    else:
        text = (f"memory is NOT below {other} by more than the seeds' spread: {seen}, spread {width:.4f}, short "
                f"by {width - mean:.4f}")
    if n >= 2:
        text += f"; the losses themselves spread {loss_width:.4f} over seeds"
    return {"holds": holds, "gap": spread(gaps), "gap_spread": width, "loss_spread": loss_width,
            "exceeds_loss_spread": n >= 2 and mean > loss_width, "text": text}


def summarize(per_seed: list[dict]) -> dict:
    """Per bank: mean/min/max over seeds of each mode's held-out loss, and the verdicts against none and control."""
    out = {}
    for bank in BANKS:
        losses = {m: [r["banks"][bank]["overall"][m]["loss"] for r in per_seed] for m in MODES}
        v = {other: verdict(losses, other) for other in ("none", "control")}
        out[bank] = {"loss": {m: spread(xs) for m, xs in losses.items()}, "verdict": v,
                     "memory_helps": v["none"]["holds"] and v["control"]["holds"]}
    return out


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(BANKS), figsize=(5 * len(BANKS), 3.6), sharey=True)
    for ax, bank in zip(axes, BANKS):
        s = results["summary"][bank]["loss"]
        means = [s[m]["mean"] for m in MODES]
        err = [[s[m]["mean"] - s[m]["min"] for m in MODES], [s[m]["max"] - s[m]["mean"] for m in MODES]]
        ax.bar(MODES, means, yerr=err, capsize=4, color=["C0", "C7", "C2", "C3"])
        lo, hi = min(s[m]["min"] for m in MODES), max(s[m]["max"] for m in MODES)
        ax.set_ylim(lo - 0.3 * (hi - lo + 0.01), hi + 0.3 * (hi - lo + 0.01))
        ax.set_title(f"bank {bank} the held-out references", fontsize=10)
        ax.set_ylabel("held-out loss (nats/token)")
    fig.suptitle(f"Debian man pages, {results['settings']['preset']}, seeds {results['seeds']} "
                 f"(bars: mean, whiskers: min-max)", fontsize=10)
    save_figure(fig, path)


def lever_table(paths: list[Path]) -> str:
    """A markdown table of results JSONs (one row per run and seed): what each changed against FULL's training
    settings, the held-out losses with the training references in the bank, and the gaps memory-off - memory and
    control - memory, with and without the held-out pages' references (> 0: memory helps)."""
    defaults = {k: FULL[k] for k in ("preset", "vocab_size", "chunks_per_sequence", "batch_size", "warmup_steps",
                                     "continual_steps", "eval_every", "heldout_fraction")} | {"reference_fraction": 0.5}
    rows = ["| run | seed | changed | memory | memory off | RAG | control | off - memory | control - memory | "
            "with held-out refs: off - memory, control - memory | train s |", "|" + "---|" * 11]
    for path in paths:
        for r in read_json(path)["per_seed"]:
            st = r["settings"]
            changed = ", ".join(f"{k} {st[k]}" for k in defaults if st.get(k) != defaults[k])
            changed = ", ".join(x for x in (changed, " ".join(st.get("set", []))) if x) or "(defaults)"
            w, h = (r["banks"][b]["overall"] for b in BANKS)
            rows.append(f"| {path.stem} | {r['seed']} | {changed} | " + " | ".join(
                f"{w[m]['loss']:.4f}" for m in MODES) + f" | {w['none']['loss'] - w['memory']['loss']:+.4f} | "
                f"{w['control']['loss'] - w['memory']['loss']:+.4f} | {h['none']['loss'] - h['memory']['loss']:+.4f}, "
                f"{h['control']['loss'] - h['memory']['loss']:+.4f} | {r['seconds']['train']:.0f} |")
    return "\n".join(rows)


# ---- command line ---------------------------------------------------------------------------------------------

QUICK = dict(max_docs=30, max_bytes=60_000, preset="tiny", vocab_size=1000, chunks_per_sequence=2, batch_size=2,
             warmup_steps=4, continual_steps=4, eval_every=2, heldout_fraction=0.2, seeds=[0, 1])
FULL = dict(max_docs=400, max_bytes=800_000, preset="tiny", vocab_size=2048, chunks_per_sequence=4, batch_size=16,
            warmup_steps=300, continual_steps=200, eval_every=50, heldout_fraction=0.1, seeds=[0, 1, 2])


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"defaults: {FULL}\n--quick:  {QUICK}")
    p.add_argument("--quick", action="store_true", help="a short run of the same code (a small corpus, a few steps)")
    p.add_argument("--out", default=None, help="result JSON, a PNG beside it (default: experiments/results/"
                                               "real_corpus.json, or real_corpus_quick.json with --quick)")
    p.add_argument("--work", default=None, help="corpus and runs (default: --out without .json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (each: split, init, batches)")
    p.add_argument("--corpus", default=None, help="a folder of .txt files to use instead of preparing man pages")
    p.add_argument("--prepare-only", action="store_true", help="prepare the corpus, then stop")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print a markdown table of these results JSONs (one "
                                                              "row per run and seed: the levers' table), then stop")
    g = p.add_argument_group("corpus (man pages)")
    g.add_argument("--man-root", default=MAN_ROOT, help="holds man2/, man3/, ...")
    g.add_argument("--sections", nargs="+", default=list(SECTIONS), help="manual sections to read")
    g.add_argument("--packages", nargs="*", default=list(PACKAGES),
                   help="only the pages of these Debian packages (by dpkg-query -L); none: every page")
    g.add_argument("--max-docs", type=int, default=None, help="at most this many pages")
    g.add_argument("--max-bytes", type=int, default=None, help="stop adding pages once the text is this long")
    g.add_argument("--max-page-bytes", type=int, default=40_000, help="skip pages longer than this, rendered")
    g = p.add_argument_group("training (mini-m3 train)")
    for flag, kind in (("preset", str), ("vocab-size", int), ("chunks-per-sequence", int), ("batch-size", int),
                       ("warmup-steps", int), ("continual-steps", int), ("eval-every", int),
                       ("heldout-fraction", float)):
        g.add_argument(f"--{flag}", type=kind, default=None, help=f"train's --{flag} (default: below)")
    g.add_argument("--reference-fraction", type=float, default=0.5, help="knowledge-base share (train's default)")
    g.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="train's --set: Memory3Config overrides, e.g. reference_length=64 chunk_length=32")
    a = p.parse_args(argv)
    a.argv = [sys.argv[0] if argv is None else "experiments/real_corpus.py",
              *(sys.argv[1:] if argv is None else argv)]  # the command line, also when called in-process
    a.out = a.out or str(RESULTS / f"real_corpus{'_quick' if a.quick else ''}.json")
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for k in ("max_docs", "max_bytes", "max_page_bytes", "threads", "eval_every", "batch_size", "vocab_size",
              "chunks_per_sequence"):  # --eval-every 0 would keep no best checkpoint
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(a, k)}")
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds: each seed once, got {a.seeds}")
    return a


def run(a, log=print) -> dict:
    out = Path(a.out)
    work = Path(a.work) if a.work else out.with_suffix("")
    if a.corpus:
        corpus = Path(a.corpus)
        files = sorted(corpus.rglob("*.txt")) if corpus.is_dir() else []
        if not files:
            raise ValueError(f"--corpus {corpus}: no .txt files there")
        pages = [{"file": f.relative_to(corpus).as_posix(), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                 for f in files]
        manifest = {"source": str(corpus), "kept": len(files), "bytes": sum(f.stat().st_size for f in files),
                    "corpus_sha256": corpus_sha256(pages)}
    else:
        corpus, manifest = prepare(work, a, log)
        manifest = {"source": f"man pages ({a.man_root})", "manifest": str(corpus / MANIFEST),
                    **{k: manifest[k] for k in ("found", "kept", "skipped", "skipped_by_reason", "bytes",
                                                "corpus_sha256", "settings")}}
    if a.prepare_only:
        return {"corpus": manifest}
    per_seed = [run_seed(a, corpus, manifest["corpus_sha256"], s, work, log) for s in a.seeds]
    results = {"argv": a.argv, "corpus": manifest, "seeds": a.seeds, "threads": a.threads,
               "settings": seed_settings(a, manifest["corpus_sha256"]), "per_seed": per_seed,
               "summary": summarize(per_seed),
               "note": "each seed draws its own held-out and knowledge-base documents (--seed) and its own "
                       "initialisation; the models are the best checkpoints by held-out loss (best.json)"}
    write_json(out, results, seed=a.seeds[0])
    plot(results, png_path(out))
    for bank in BANKS:
        s = results["summary"][bank]
        log(f"bank {bank} the held-out references: " + ", ".join(
            f"{m} {v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" for m, v in s["loss"].items()))
        for v in s["verdict"].values():
            log(f"  {v['text']}")
    log(f"results in {out} and {png_path(out)}")
    return results


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.table:
            print(lever_table([Path(t) for t in a.table]))
            return 0
        run(a)
    except (ValueError, OSError) as e:
        print(f"real_corpus: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
