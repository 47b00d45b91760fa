"""§4.3 knowledge base, §3.4 retrieval on real text: experiments/real_corpus.py (issue 18 part 2), man pages.

Preparation runs on a small man tree written here (troff pages: good, gzipped, aliases, one that fails to render,
an empty one, a translated tree and an unselected section); the end-to-end run (`--quick`) on a generated corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

from conftest import load_experiment
from test_own_corpus import write_corpus

rc = load_experiment("real_corpus")
needs_man = pytest.mark.skipif(shutil.which("man") is None,
                               reason="`man` (man-db) is not installed here: apt-get install man-db groff-base")

WORDS = ("The {name} call reads the {thing} of a file descriptor and returns the number of bytes it copied into the "
         "buffer. If the descriptor refers to a pipe, {name} blocks until a writer appears; on error it returns -1 "
         "and sets errno. Unlike the older interface, {name} never truncates the {thing}. ")


def page(name: str, section: str, paragraphs: int = 3) -> str:
    body = "\n.PP\n".join(WORDS.format(name=f"\\fB{name}\\fP()", thing=t) for t in ("header", "offset", "tail")
                          [:paragraphs])
    return (f'.\\" a comment line first, as real pages have\n.TH {name.upper()} {section} 2024-01-01 '
            f'"mini-m3 tests" "Test Manual"\n.SH NAME\n{name} \\- read a {name}\n.SH DESCRIPTION\n{body}\n'
            f".SH SEE ALSO\n.BR other ({section})\n")


def man_tree(root):
    """7 files in the selected sections: 3 pages, 2 aliases (a .so stub, a symlink), 1 failing, 1 empty."""
    for d in ("man2", "man3", "man5", "man7", "man1", "de/man2"):
        (root / d).mkdir(parents=True)
    (root / "man2" / "frob.2").write_text(page("frob", "2"))
    (root / "man3" / "twiddle.3.gz").write_bytes(gzip.compress(page("twiddle", "3").encode()))
    (root / "man7" / "overview.7").write_text(page("overview", "7", paragraphs=2))
    (root / "man2" / "frob64.2").write_text(".so man2/frob.2\n")
    (root / "man3" / "twiddle_r.3.gz").symlink_to("twiddle.3.gz")
    (root / "man2" / "broken.2").write_text(".TH BROKEN 2\n.SH NAME\nbroken\n.ab this page aborts troff\n")
    (root / "man5" / "empty.5").write_text("")
    (root / "man1" / "ls.1").write_text(page("ls", "1"))  # section 1: not selected
    (root / "de" / "man2" / "frob.2").write_text(page("frob", "2"))  # translated: never read
    return root


def prepare(tmp_path, *extra):
    work = tmp_path / "work"
    args = ["--prepare-only", "--man-root", str(tmp_path / "man"), "--packages", "--work", str(work),
            "--out", str(tmp_path / "r.json"), *extra]
    return rc.main(args), work / "corpus"


@needs_man
def test_prepare_renders_selected_pages_and_names_what_it_skipped(tmp_path, capsys):
    man_tree(tmp_path / "man")
    code, corpus = prepare(tmp_path)
    assert code == 0, capsys.readouterr().err
    m = json.loads((corpus / "manifest.json").read_text())
    assert sorted(p.name for p in corpus.glob("*.txt")) == ["frob.2.txt", "overview.7.txt", "twiddle.3.txt"]
    assert (m["found"], m["kept"], m["skipped"]) == (7, 3, 4)
    reasons = {s["source"].split("/man/")[1]: s["reason"] for s in m["skipped_pages"]}
    assert reasons["man2/frob64.2"] == "alias: of man2/frob.2"
    assert reasons["man3/twiddle_r.3.gz"] == "alias: of twiddle.3.gz"
    assert reasons["man2/broken.2"].startswith("render failed: man exit") and "aborts troff" in reasons["man2/broken.2"]
    assert reasons["man5/empty.5"].startswith("empty:")
    assert m["skipped_by_reason"] == {"alias": 2, "render failed": 1, "empty": 1}
    for p in m["pages"]:
        data = (corpus / p["file"]).read_bytes()
        assert p["bytes"] == len(data) and p["sha256"] == hashlib.sha256(data).hexdigest()
        assert p["package"] is None and p["version"] is None  # no Debian package owns a file in tmp_path
    assert m["bytes"] == sum(p["bytes"] for p in m["pages"])
    text = (corpus / "twiddle.3.txt").read_text(encoding="utf-8")  # gzipped, rendered, cleaned
    assert text.startswith("NAME\ntwiddle - read a twiddle\n") and "TWIDDLE(3)" not in text
    assert "\x08" not in text and "\x1b" not in text and "never truncates the tail" in " ".join(text.split())
    assert "\nDESCRIPTION\nThe twiddle() call reads" in text  # the body indent removed, no hyphenation
    assert "prepared before" not in capsys.readouterr().out

    # the same settings: reused; a cap: prepared again, the first pages of the fixed order, the rest counted
    assert prepare(tmp_path)[0] == 0 and "prepared before" in capsys.readouterr().out
    code, corpus = prepare(tmp_path, "--max-docs", "1")
    m1 = json.loads((corpus / "manifest.json").read_text())
    assert code == 0 and m1["kept"] == 1 and len(list(corpus.glob("*.txt"))) == 1
    assert m1["found"] == 7 and m1["skipped"] == 6 and m1["skipped_by_reason"]["alias"] == 2
    assert sum(m1["skipped_by_reason"].values()) == 6 and m1["pages"][0]["file"] in {p["file"] for p in m["pages"]}
    assert not list((tmp_path / "work").glob(".corpus-*"))  # no temporary folder left behind


@needs_man
def test_prepare_skips_pages_over_the_page_cap(tmp_path, capsys):
    man_tree(tmp_path / "man")
    code, corpus = prepare(tmp_path, "--max-page-bytes", "900")
    m = json.loads((corpus / "manifest.json").read_text())
    assert code == 0 and [p["file"] for p in m["pages"]] == ["overview.7.txt"]  # 2 paragraphs: the short one
    assert m["skipped_by_reason"]["over --max-page-bytes"] == 2


@needs_man
@pytest.mark.parametrize("tree", ["none", "only_aliases", "other_section"])
def test_no_pages_is_one_clear_error(tmp_path, capsys, tree):
    root = tmp_path / "man"
    root.mkdir()
    if tree == "only_aliases":
        (root / "man2").mkdir()
        (root / "man2" / "a.2").write_text(".so man2/b.2\n")
    elif tree == "other_section":
        (root / "man1").mkdir()
        (root / "man1" / "ls.1").write_text(page("ls", "1"))
    code, corpus = prepare(tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no manual pages found" in err and str(root) in err and "apt-get install manpages manpages-dev" in err
    assert not corpus.exists()


@needs_man
@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system: no dpkg-query")
def test_packages_not_installed_are_named(tmp_path, capsys):
    man_tree(tmp_path / "man")
    code, _ = prepare(tmp_path, "--packages", "mini-m3-no-such-package")
    err = capsys.readouterr().err
    assert code == 2 and "not installed: mini-m3-no-such-package" in err and "apt-get install" in err


def test_missing_man_or_dpkg_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import shutil as shutil_
    which = shutil_.which
    for missing, expected in (("man", "`man` not found: apt-get install manpages manpages-dev man-db"),
                              ("dpkg-query", "dpkg-query not found (not a Debian system?): pass --packages with "
                                             "no names")):
        # the other tool present (a stand-in path where this machine has none: its version is then "unknown")
        monkeypatch.setattr(rc.shutil, "which", lambda cmd: None if cmd == missing else which(cmd) or f"/x/{cmd}")
        code = rc.main(["--prepare-only", "--man-root", str(tmp_path), "--work", str(tmp_path / "work"), "--out",
                        str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_clean_removes_terminal_formatting_header_footer_and_indent():
    raw = ("FROB(2)            Test Manual            FROB(2)\n\nN\bNA\bAM\bME\bE\n       f\bfr\bro\bob\bb "
           "- \x1b[1mread\x1b[0m   \n       _\bu_\bn_\bd_\be_\br\n              nested\n\n\n\n"
           "mini-m3 tests      2024-01-01      FROB(2)\n")
    assert rc.clean(raw) == "NAME\nfrob - read\nunder\n       nested\n"
    # a first line that is not a running header (no matching footer) is text, kept
    assert rc.clean("alpha(1) beta\ngamma\n") == "alpha(1) beta\ngamma\n"


def test_clean_removes_a_header_squeezed_by_a_long_page_name():
    # man at 80 columns runs a long name's header into one word (Debian's pthread_attr_setstacksize.3)
    raw = ("pthread_attr_setstacksize(3Library Functions Manuapthread_attr_setstacksize(3)\n\nNAME\n       body\n\n"
           "Linux man-pages 6.03              2022-12-15      pthread_attr_setstacksize(3)\n")
    assert rc.clean(raw) == "NAME\nbody\n"


def test_verdict_is_paired_over_seeds_and_says_by_how_much():
    wins = rc.verdict({"memory": [4.0, 4.3, 4.1], "none": [4.05, 4.36, 4.14]}, "none")
    assert wins["holds"] and wins["gap"]["min"] == pytest.approx(0.04) and wins["gap_spread"] == pytest.approx(0.02)
    assert wins["loss_spread"] == pytest.approx(0.31) and not wins["exceeds_loss_spread"]
    assert wins["text"].startswith("memory is below none") and "0.31" in wins["text"]
    loses = rc.verdict({"memory": [4.0, 4.3, 4.1], "control": [4.05, 4.28, 4.12]}, "control")
    assert not loses["holds"] and loses["gap"]["mean"] == pytest.approx(0.05 / 3)  # gaps 0.05, -0.02, 0.02
    assert "NOT below control" in loses["text"] and f"short by {0.07 - 0.05 / 3:.4f}" in loses["text"]
    one = rc.verdict({"memory": [4.0], "none": [4.5]}, "none")
    assert not one["holds"] and "one seed" in one["text"]


def test_corpus_option_needs_txt_files_and_a_seed_folder_of_its_own(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rc.main(["--quick", "--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "r.json")]) == 2
    assert "--corpus" in capsys.readouterr().err
    write_corpus(tmp_path / "texts", n=3)
    (tmp_path / "work" / "seed0").mkdir(parents=True)
    (tmp_path / "work" / "seed0" / "mine.txt").write_text("not the script's")
    assert rc.main(["--quick", "--corpus", str(tmp_path / "texts"), "--work", str(tmp_path / "work"),
                    "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "seed0 exists and was not made by this script" in err
    assert (tmp_path / "work" / "seed0" / "mine.txt").exists() and not (tmp_path / "r.json").exists()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_corpus")
    write_corpus(root / "texts")
    argv = ["--quick", "--quiet", "--corpus", str(root / "texts"), "--work", str(root / "work")]
    with pytest.MonkeyPatch.context() as mp:  # `mini-m3 ... --quiet` sets TQDM_DISABLE: not for the next tests
        mp.setenv("TQDM_DISABLE", "1")
        assert rc.main([*argv, "--out", str(root / "r.json")]) == 0
    return dict(root=root, argv=argv, result=json.loads((root / "r.json").read_text()))


@pytest.mark.slow
def test_quick_end_to_end_writes_losses_per_seed_and_over_seeds(quick):
    r, root = quick["result"], quick["root"]
    assert r["seeds"] == [0, 1] and [s["seed"] for s in r["per_seed"]] == [0, 1]
    assert r["provenance"]["seed"] == 0 and r["argv"] == ["experiments/real_corpus.py", *quick["argv"], "--out",
                                                           str(root / "r.json")]
    assert r["corpus"]["kept"] == 30 and len(r["corpus"]["corpus_sha256"]) == 64
    assert r["settings"]["preset"] == "tiny" and r["settings"]["corpus_sha256"] == r["corpus"]["corpus_sha256"]
    assert (root / "r.png").stat().st_size > 0
    for s in r["per_seed"]:
        assert s["models"] == {"best_model": str(root / "work" / f"seed{s['seed']}" / "best_model"),
                               "control_best_model": str(root / "work" / f"seed{s['seed']}" / "control_best_model")}
        assert set(s["best"]) == {"best_model", "control_best_model"}
        assert s["pipeline"]["heldout_documents"] > 0 and s["seconds"]["total"] > 0
        for bank in ("without", "with"):
            b = s["banks"][bank]
            assert set(b["overall"]) == {"memory", "none", "rag", "control"}
            assert all(math.isfinite(v["loss"]) and v["loss"] > 0 for v in b["overall"].values())
            assert b["bank_holds_heldout_references"] is (bank == "with")
            assert b["heldout_documents"] == s["pipeline"]["heldout_documents"]
            assert b["overall"]["memory"]["loss"] != b["overall"]["none"]["loss"]
        # the same held-out documents and models for both banks: memory-off and the control do not read the bank
        assert s["banks"]["with"]["overall"]["none"] == s["banks"]["without"]["overall"]["none"]
        assert s["banks"]["with"]["overall"]["control"] == s["banks"]["without"]["overall"]["control"]
    for bank in ("without", "with"):
        sm = r["summary"][bank]
        for mode in ("memory", "none", "rag", "control"):
            xs = [s["banks"][bank]["overall"][mode]["loss"] for s in r["per_seed"]]
            assert sm["loss"][mode] == pytest.approx({"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)})
        for other in ("none", "control"):
            v = sm["verdict"][other]
            gaps = [s["banks"][bank]["overall"][other]["loss"] - s["banks"][bank]["overall"]["memory"]["loss"]
                    for s in r["per_seed"]]
            assert v["gap"]["mean"] == pytest.approx(statistics.fmean(gaps))
            assert v["holds"] == (min(gaps) > 0 and statistics.fmean(gaps) > max(gaps) - min(gaps))
            assert other in v["text"]
        assert sm["memory_helps"] == (sm["verdict"]["none"]["holds"] and sm["verdict"]["control"]["holds"])


@pytest.mark.slow
def test_quick_seeds_are_reused_with_the_same_settings_and_rerun_with_others(quick, capsys, monkeypatch):
    root, argv = quick["root"], quick["argv"]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capsys.readouterr()
    assert rc.main([*argv, "--seeds", "1", "--out", str(root / "again.json")]) == 0
    assert "seed 1: results of" in capsys.readouterr().out
    again = json.loads((root / "again.json").read_text())
    assert again["per_seed"] == [quick["result"]["per_seed"][1]]
    assert rc.main([*argv, "--seeds", "1", "--continual-steps", "2", "--out", str(root / "other.json")]) == 0
    assert "run with other settings: starting it afresh" in capsys.readouterr().out
    other = json.loads((root / "other.json").read_text())
    assert other["per_seed"][0]["settings"]["continual_steps"] == 2
    assert other["per_seed"][0]["banks"] != again["per_seed"][0]["banks"]


@pytest.mark.slow
def test_quick_set_lever_reaches_the_model_and_the_levers_table(quick, capsys, monkeypatch):
    """`--set reference_length=64` (a lever of issue 18) is a setting of its own (rerun, recorded), reaches the trained
    model, and the table names it against the defaults' rows."""
    root, argv = quick["root"], quick["argv"]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = root / "ref64.json"
    assert rc.main([*argv, "--seeds", "0", "--set", "reference_length=64", "--work", str(root / "work64"),
                    "--out", str(out)]) == 0
    r = json.loads(out.read_text())["per_seed"][0]
    assert r["settings"]["set"] == ["reference_length=64"]
    assert json.loads((Path(r["models"]["best_model"]) / "config.json").read_text())["reference_length"] == 64
    capsys.readouterr()
    assert rc.main(["--table", str(root / "r.json"), str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 3  # header, rule, seeds 0 and 1 of r.json, seed 0 of ref64.json
    assert lines[2].startswith("| r | 0 | ") and "batch_size 2" in lines[2] and lines[4].startswith("| ref64 | 0 |")
    assert "reference_length=64" in lines[4] and "reference_length=64" not in lines[2]
