"""The `clipcond` dispatcher: help at every level, fast start, errors as one line."""

import subprocess
import sys

import pytest

from clipcond import cli


def _leaves(node, path=()):
    for name, child in node.items():
        if isinstance(child, cli.Command):
            yield (*path, name)
        else:
            yield from _leaves(child, (*path, name))


def test_top_level_help_lists_every_group(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in text


@pytest.mark.parametrize("path", list(_leaves(cli.COMMANDS)), ids=" ".join)
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*path, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"clipcond {' '.join(path)}" in text
    assert "%%" not in text  # a description is not %-formatted by argparse: "%%" would show as typed


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["train", "nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_help_imports_no_model_library():
    """`clipcond --help` must answer at once: importing torch/diffusers/transformers costs seconds."""
    code = "import sys, clipcond.cli as c; c.main(['--help']); print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
