"""Issue 17: every flag of every `mini-m3` subcommand has help text, and --help shows its default."""
import argparse

import pytest

from mini_m3.cli import build_parser

SUBCOMMANDS = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_subcommand_is_walked():
    assert {"demo", "smoke", "train", "build-bank", "generate", "evaluate", "sft", "dpo"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_has_help_text(command):
    parser = SUBCOMMANDS[command]
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
               if a.dest != "help" and not (a.help or "").strip()]
    assert not missing, f"mini-m3 {command}: no help text for {missing}"
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter  # --help shows every default
