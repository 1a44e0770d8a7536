"""The committed notebooks are stripped: no outputs, no execution counts (pytest --nbmake executes them in CI)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
STRIP_HINT = "rebuild it with its notebooks/_build*.py, or strip it: `jupyter nbconvert --clear-output --inplace`"


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_has_no_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook.get("nbformat") == 4, f"{path.name}: nbformat {notebook.get('nbformat')!r}, expected 4"
    dirty = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            dirty.append(f"cell {index} has {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            dirty.append(f"cell {index} has execution count {cell['execution_count']}")
    assert not dirty, f"{path.name}: " + "; ".join(dirty) + f"; {STRIP_HINT}"


def test_the_check_catches_outputs(tmp_path):
    """The check above on an executed cell: it must not pass vacuously on a key it does not look at."""
    cell = {"cell_type": "code", "source": "1", "metadata": {}, "execution_count": 3, "outputs": [{"x": 1}]}
    path = tmp_path / "dirty.ipynb"
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [cell]}))
    with pytest.raises(AssertionError, match=r"cell 0 has 1 output\(s\); cell 0 has execution count 3"):
        test_notebook_has_no_outputs(path)
