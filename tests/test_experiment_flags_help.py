"""Issue 17: every flag of every experiment script (and of any parser in mini_m3) has help text.

Read from the source with `ast`, so no script is imported or run: every `add_argument(...)` call must pass
`help=` (a flag made in a loop too: a dict lookup is fine), and not `help=None` or an empty string."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources() -> list[Path]:
    return sorted(ROOT.glob("experiments/*.py")) + sorted(ROOT.glob("mini_m3/**/*.py"))


def flags_without_help(path: Path) -> list[str]:
    """`file:line` of each add_argument call in `path` with no help= keyword, or help=None / a blank string."""
    missing = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        help_ = next((k.value for k in node.keywords if k.arg == "help"), None)
        blank = isinstance(help_, ast.Constant) and (help_.value is None
                                                     or (isinstance(help_.value, str) and not help_.value.strip()))
        if help_ is None or blank:
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            missing.append(f"{name}:{node.lineno}")
    return missing


def test_the_walk_sees_the_experiment_scripts_and_the_package():
    files = {p.relative_to(ROOT).as_posix() for p in sources()}
    assert {"experiments/_common.py", "experiments/reading_levers.py", "mini_m3/cli.py"} <= files


def test_every_add_argument_has_help_text():
    missing = [where for path in sources() for where in flags_without_help(path)]
    assert not missing, f"add_argument without help text: {missing}"


def test_a_flag_without_help_text_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import argparse\n"
                   "p = argparse.ArgumentParser()\n"
                   "p.add_argument('--ok', help='fine')\n"
                   "p.add_argument('--none')\n"
                   "p.add_argument('--null', help=None)\n"
                   "p.add_argument('--blank', help='  ')\n"
                   "for f in ('a', 'b'):\n"
                   "    p.add_argument('--' + f, type=int)\n"
                   "for f in ('c', 'd'):\n"
                   "    p.add_argument('--' + f, help=HELP[f])\n")
    assert flags_without_help(bad) == [f"{bad}:{n}" for n in (4, 5, 6, 8)]
