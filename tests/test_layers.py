"""Imports run one way: commands -> evaluation / training -> library (README, "Architecture").

Every module of `clipcond/`, `train/` (`clipcond.train`) and `pipelines/` (`clipcond.pipelines`) is parsed, and each
import in it, at the top or inside a function, is checked:

- nothing imports a command module (`COMMANDS`): a command is a leaf that parses its flags and calls down, so the
  helpers two commands share live in the library (`clipcond.__main__` running `clipcond.cli` is the one exception);
- a library module imports no evaluation or training module;
- no module imports another's `_private` name (`from m import _name`, or `m._name` after `import m`): a name that is
  shared is public.

`clipcond.index` is the `ImageIndex` library; the `clipcond index` command is `clipcond.build_index`.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's files lie (pyproject.toml maps pipelines/ and train/ under clipcond).
PACKAGES = {"clipcond": ROOT / "clipcond", "clipcond.pipelines": ROOT / "pipelines", "clipcond.train": ROOT / "train"}

COMMANDS = frozenset(
    {
        "clipcond.__main__",
        "clipcond.ask",
        "clipcond.build_index",
        "clipcond.caption",
        "clipcond.cli",
        "clipcond.demo",
        "clipcond.export_diffusers",
        "clipcond.export_open_clip",
        "clipcond.export_stable_diffusion",
        "clipcond.generate",
        "clipcond.interpolate",
        "clipcond.probe",
        "clipcond.search",
        "clipcond.serve",
        "clipcond.vary",
    }
)
ALLOWED_COMMAND_IMPORTS = {("clipcond.__main__", "clipcond.cli")}  # `python -m clipcond` is the CLI
# Figures drawn with Pillow alone, imported by the library's image writer: library, though it sits in evaluation/.
LIBRARY_IN_EVALUATION = frozenset({"clipcond.plots"})

COMMAND, MIDDLE, LIBRARY = "command", "evaluation/training", "library"


def layer(module: str) -> str:
    if module in COMMANDS:
        return COMMAND
    if module.split(".")[:2] in (["clipcond", "evaluation"], ["clipcond", "train"]):
        return MIDDLE
    return LIBRARY


def find_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the three packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    # `clipcond/` holds no pipelines/ or train/ folder, so no name is found twice.
    return modules


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # the module imported from, absolute
    name: str | None  # the name taken from it (`from module import name`, `module.name`), None for the module itself


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports(source: str, module: str, known: set[str], is_package: bool = False) -> list[Import]:
    """Every import of `source` (the text of `module`), wherever it stands (`importlib.import_module("...")` with a
    literal name too), and every `alias._name` read from a module it imported; `from package import submodule` counts
    as an import of the submodule. In the order of the lines."""
    tree = ast.parse(source)
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(node.lineno, alias.name, None))
                bound = alias.asname or alias.name.split(".")[0]  # `import a.b` binds `a`
                aliases[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{source_module}.{alias.name}"
                if submodule in known:
                    found.append(Import(node.lineno, submodule, None))
                    aliases[alias.asname or alias.name] = submodule
                else:
                    found.append(Import(node.lineno, source_module, alias.name))
        elif _literal_import_module(node):
            found.append(Import(node.lineno, node.args[0].value, None))
    for node in ast.walk(tree):
        # `m._name` with `m` an imported module: the same as `from m import _name`.
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append(Import(node.lineno, aliases[node.value.id], node.attr))
    return sorted(found, key=lambda imp: imp.line)


def _literal_import_module(node: ast.AST) -> bool:
    """`import_module("a.b")` or `importlib.import_module("a.b")`, the name written out."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name == "import_module" and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)


def is_private(name: str | None) -> bool:
    return name is not None and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(module: str, source: str, known: set[str], is_package: bool = False) -> list[str]:
    """What in `source` (the text of `module`) breaks the rules of this file, one line each."""
    problems = []
    for imp in imports(source, module, known, is_package):
        target = imp.module if imp.module in known else None
        if target is None or target == module:
            continue  # another library (torch, open_clip, ...): its privates are its own business
        what = f"{imp.name} from" if imp.name else "the"
        if target in COMMANDS and (module, target) not in ALLOWED_COMMAND_IMPORTS:
            problems.append(f"line {imp.line}: imports {what} command module {target}")
        elif layer(module) == LIBRARY and layer(target) == MIDDLE:
            problems.append(f"line {imp.line}: the library module imports {what} {target}, a layer above it")
        if is_private(imp.name):
            problems.append(f"line {imp.line}: imports the private {imp.name} of {target}")
    return list(dict.fromkeys(problems))  # `m._name` read twice on a line is one problem


MODULES = find_modules()


def test_the_packages_are_found():
    for module in ("clipcond.cli", "clipcond.generate", "clipcond.pipelines.unclip", "clipcond.train.loop"):
        assert module in MODULES
    assert set(COMMANDS) <= set(MODULES), f"commands not found: {sorted(set(COMMANDS) - set(MODULES))}"


def test_imports_run_one_way():
    known = set(MODULES)
    problems = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        for problem in violations(module, source, known, is_package=path.name == "__init__.py"):
            problems.append(f"{path.relative_to(ROOT)} {problem}")
    assert not problems, (
        "imports against the layers (README, Architecture): move what a command shares to the library, make a shared "
        "name public\n" + "\n".join(problems)
    )


# ---------------------------------------------------------------- the checker itself, on made-up modules

KNOWN = {"clipcond", "clipcond.generate", "clipcond.storage", "clipcond.evaluation", "clipcond.evaluation.unclip"}


def _check(module: str, source: str, is_package: bool = False) -> list[str]:
    return violations(module, textwrap.dedent(source), KNOWN, is_package)


@pytest.mark.parametrize(
    "source",
    [
        "from clipcond.generate import DTYPES",
        "import clipcond.generate",
        "import clipcond.generate as g",
        "from clipcond import generate",
        "def f():\n    from clipcond.generate import DTYPES",
        "from .generate import DTYPES",
        "import importlib\nimportlib.import_module('clipcond.generate')",
    ],
)
def test_a_command_import_is_caught(source):
    (problem,) = _check("clipcond.storage", source)
    assert problem.endswith("command module clipcond.generate")


def test_a_relative_command_import_from_a_subpackage_is_caught():
    (problem,) = _check("clipcond.evaluation.unclip", "from ..generate import DTYPES")
    assert problem.endswith("command module clipcond.generate")


def test_the_library_may_not_import_evaluation():
    (problem,) = _check("clipcond.storage", "def f():\n    from clipcond.evaluation.unclip import main")
    assert "a layer above" in problem
    assert _check("clipcond.evaluation.unclip", "from clipcond.storage import writing") == []


@pytest.mark.parametrize(
    "source",
    [
        "from clipcond.storage import _helper",
        "from clipcond import storage\nstorage._helper()",
        "import clipcond.storage as storage\nstorage._helper()",
    ],
)
def test_a_private_import_is_caught(source):
    (problem,) = _check("clipcond.evaluation.unclip", source)
    assert "private _helper of clipcond.storage" in problem


def test_what_is_allowed():
    source = """
        import torch
        from open_clip.model import _build_text_tower
        from clipcond import __version__
        from clipcond.storage import writing
        from . import storage
        from .evaluation.unclip import main
        """
    assert _check("clipcond.generate", source) == []
