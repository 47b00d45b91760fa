"""Notebooks as teaching documents (issue 17): each closes with "## What we learned" in at most 200 words, and every
number that section quotes is printed by one of the notebook's code cells (its committed outputs), so the text
cannot drift from what the cells compute. nbmake re-executes the cells; this reads what is committed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# a decimal (0.973, 3.9750) or a number of two or more digits (7231, 18,191); single digits are counts in prose
NUMBER = re.compile(r"\d[\d,]*\.\d+|\d{2,}(?:,\d{3})*")


def closing_and_outputs(path: Path) -> tuple[str, str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    closing = [("".join(c["source"])) for c in nb["cells"]
               if c["cell_type"] == "markdown" and "".join(c["source"]).startswith("## What we learned")]
    assert len(closing) == 1, f"{path.name}: expected one '## What we learned' cell, found {len(closing)}"
    outputs = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                        for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    return closing[0], outputs


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_what_we_learned_is_short_and_quotes_only_printed_numbers(path):
    closing, outputs = closing_and_outputs(path)
    assert len(closing.split()) <= 200, f"{path.name}: 'What we learned' has {len(closing.split())} words (> 200)"
    missing = [n for n in NUMBER.findall(closing) if n not in outputs and n.replace(",", "") not in outputs]
    assert not missing, f"{path.name}: numbers in 'What we learned' that no cell prints: {missing}"


def test_the_check_catches_a_typed_number(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": ["print(0.973)"], "outputs": [{"text": ["0.973\n"]}]},
                    {"cell_type": "markdown", "source": ["## What we learned\n", "held-out 0.973, not 0.975"]}]}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    closing, outputs = closing_and_outputs(path)
    assert [n for n in NUMBER.findall(closing) if n not in outputs] == ["0.975"]
