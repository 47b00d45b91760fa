"""Issue 17: every results JSON says how it was made. A run records `provenance` (argv, commit, versions: written
by `experiments/_common.write_json` and the demo, some scripts also put `argv` at the top level); a file that
predates that carries `provenance_reconstructed` instead, filled in afterwards from git history and the docs.
A new results JSON with neither fails here."""
import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RECONSTRUCTED_KEYS = {"argv", "committed_in", "committed_at", "code_commit", "versions", "note"}
SHA = re.compile(r"[0-9a-f]{40}")
SHORT_SHA = re.compile(r"[0-9a-f]{7,40}")


def _is_argv(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(a, str) and a for a in x)


def provenance_problems(path: Path) -> list[str]:
    """What is missing from one results JSON's record of how it was made (empty: nothing)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return [f"unreadable: {e}"]
    if not isinstance(d, dict):
        return ["not a JSON object"]
    prov, rec = d.get("provenance"), d.get("provenance_reconstructed")
    if prov is None and rec is None:
        return ["neither `provenance` nor `provenance_reconstructed`"]
    problems = []
    if prov is not None:
        if not isinstance(prov, dict):
            return ["`provenance` is not an object"]
        if not _is_argv(prov.get("argv", d.get("argv"))):
            problems.append("`provenance` without argv (in it or at the top level)")
        if not (isinstance(prov.get("commit"), str) and SHA.fullmatch(prov["commit"])):
            problems.append(f"`provenance.commit` is not a commit sha: {prov.get('commit')!r}")
    if rec is not None:
        if not isinstance(rec, dict):
            return problems + ["`provenance_reconstructed` is not an object"]
        if set(rec) != RECONSTRUCTED_KEYS:
            problems.append(f"`provenance_reconstructed` keys {sorted(rec)}, expected {sorted(RECONSTRUCTED_KEYS)}")
        if not (rec.get("argv") is None or _is_argv(rec.get("argv"))):
            problems.append("`provenance_reconstructed.argv` is neither null nor a command as a list")
        if not (isinstance(rec.get("committed_in"), str) and SHA.fullmatch(rec["committed_in"])):
            problems.append(f"`provenance_reconstructed.committed_in` is not a 40-hex sha: {rec.get('committed_in')!r}")
        try:
            datetime.fromisoformat(rec.get("committed_at"))
        except (TypeError, ValueError):
            problems.append(f"`provenance_reconstructed.committed_at` is not a date: {rec.get('committed_at')!r}")
        code = rec.get("code_commit")
        if not (code is None or (isinstance(code, str) and SHORT_SHA.fullmatch(code))):
            problems.append(f"`provenance_reconstructed.code_commit` is neither null nor a sha: {code!r}")
        if not (rec.get("versions") is None or isinstance(rec.get("versions"), dict)):
            problems.append("`provenance_reconstructed.versions` is neither null nor an object")
        if not (isinstance(rec.get("note"), str) and rec["note"].strip()):
            problems.append("`provenance_reconstructed.note` is empty")
    return problems


def results_without_provenance(results_dir: Path) -> dict[str, list[str]]:
    """{file name: problems} for every *.json in `results_dir` whose provenance is missing or incomplete."""
    found = {p.name: provenance_problems(p) for p in sorted(Path(results_dir).glob("*.json"))}
    return {name: problems for name, problems in found.items() if problems}


def test_every_results_json_records_how_it_was_made():
    assert sorted(RESULTS.glob("*.json")), f"no results JSON in {RESULTS}"
    assert results_without_provenance(RESULTS) == {}


def test_a_results_json_without_provenance_is_caught(tmp_path):
    ok = {"x": 1.5, "provenance": {"argv": ["experiments/x.py"], "commit": "a" * 40, "versions": {}}}
    ok_top_argv = {"argv": ["experiments/y.py", "--seed", "0"], "provenance": {"commit": "b" * 40}}
    ok_rec = {"x": 2, "provenance_reconstructed": {"argv": None, "committed_in": "c" * 40,
                                                   "committed_at": "2026-11-22T11:07:06+00:00",
                                                   "code_commit": "1ff357d", "versions": None,
                                                   "note": "from git history; argv unknown because ..."}}
    for name, obj in {"ok.json": ok, "ok_top_argv.json": ok_top_argv, "ok_rec.json": ok_rec}.items():
        (tmp_path / name).write_text(json.dumps(obj, indent=1))
    assert results_without_provenance(tmp_path) == {}

    (tmp_path / "new_result.json").write_text(json.dumps({"qa": 0.97, "machine": {"torch": "2.13.0+cpu"}}, indent=1))
    (tmp_path / "no_commit.json").write_text(json.dumps({"provenance": {"argv": ["a.py"], "commit": "unknown"}}))
    (tmp_path / "no_argv.json").write_text(json.dumps({"provenance": {"commit": "d" * 40}}))
    bad_rec = dict(ok_rec["provenance_reconstructed"], committed_in="1ff357d")
    del bad_rec["note"]
    (tmp_path / "bad_rec.json").write_text(json.dumps({"provenance_reconstructed": bad_rec}))
    assert set(results_without_provenance(tmp_path)) == {"new_result.json", "no_commit.json", "no_argv.json",
                                                         "bad_rec.json"}
    assert results_without_provenance(tmp_path)["new_result.json"] == [
        "neither `provenance` nor `provenance_reconstructed`"]
    bad = " ".join(results_without_provenance(tmp_path)["bad_rec.json"])
    assert "keys" in bad and "committed_in" in bad and "note" in bad


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=30)


def test_reconstructed_commits_exist_in_this_checkout():
    """committed_in (and code_commit where named) are commits of this repository, and committed_at is that
    commit's date. Skipped without git or outside a git checkout, and in a shallow clone (no history)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git or not a git checkout")
    top = _git("rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip("not a git checkout of this repository")
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("shallow clone: the commits that added the results are not fetched")
    bad = []
    for p in sorted(RESULTS.glob("*.json")):
        rec = json.loads(p.read_text()).get("provenance_reconstructed")
        if rec is None:
            continue
        sha = rec["committed_in"]
        if _git("cat-file", "-e", f"{sha}^{{commit}}").returncode != 0:
            bad.append(f"{p.name}: committed_in {sha} is not a commit here")
            continue
        date = _git("show", "-s", "--format=%cI", sha).stdout.strip()
        if datetime.fromisoformat(date) != datetime.fromisoformat(rec["committed_at"]):
            bad.append(f"{p.name}: committed_at {rec['committed_at']} but {sha[:7]} is of {date}")
        code = rec["code_commit"]
        if code is not None and _git("cat-file", "-e", f"{code}^{{commit}}").returncode != 0:
            bad.append(f"{p.name}: code_commit {code} is not a commit here")
    assert bad == []
