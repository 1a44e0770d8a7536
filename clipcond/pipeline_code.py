"""Ship a pipeline's code in its folder, so that stock diffusers loads the folder without clipcond installed:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

diffusers' mechanism for custom code (`diffusers.utils.dynamic_modules_utils`): model_index.json names the pipeline
as `"_class_name": [module, class name]` with `module.py` at the top of the folder, and a component of a custom class
as `[module, class name]` with `module.py` in the component's folder; `trust_remote_code=True` lets diffusers import
them. It copies into its modules cache the files that such a module imports relatively (`from .x import y`), but
not the ones those import in turn.

So the folder gets the pipeline's own modules, written at save time from their source files: the pipeline class's
module and every clipcond module it imports, at the top or inside a function, transitively (`code_closure`), each
under its last name (`clipcond.pipelines.sampling` -> `sampling.py`) with its `from clipcond.<...>.x import` lines
made relative (`from .x import`), nothing else changed. An entry module, `pipeline_<module>.py`, imports every one of
them (so diffusers copies them all) and re-exports the pipeline class. A component whose class is clipcond's (the
unCLIP decoder's `ImageEmbeddingTokens`, an open_clip tower) gets the same in its folder, with the entry
`modeling_<component>.py`; model_index.json keeps its clipcond module under `_clipcond_components`.

clipcond's own classes still load these folders as themselves (`clipcond.pipelines.shipped_code`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

from clipcond.pipelines.shipped_code import SHIPPED_COMPONENTS
from clipcond.storage import write_text_atomic

PACKAGE = "clipcond"
# Not "from {module}: ..." on a first line: Python reads "# ... coding: x" there as the file's encoding (PEP 263).
SHIPPED_BY = "# Written by clipcond from the module {module}, with its imports of clipcond modules made relative.\n"
ENTRY_DOC = '''"""The entry module of this folder's {what} code, written by clipcond.

diffusers copies into its modules cache the modules that this file imports relatively, not those that they import in
turn: every shipped module is imported here, and `{class_name}` is the class to load.
"""

'''


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the source of the module {module!r}")
    path = Path(spec.origin)
    if path.name == "__init__.py" or path.suffix != ".py":
        raise ValueError(f"cannot ship {module!r}: only plain modules ship, not packages ({path})")
    return path


def _clipcond_imports(path: Path) -> list[ast.ImportFrom]:
    """The `from clipcond.<...> import` statements of a module, at any depth; an `import clipcond.<...>`, which
    cannot be made relative, is refused."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{path}:{node.lineno}: `import {PACKAGE}...` cannot ship; write `from ... import`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            found.append(node)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise ValueError(f"{path}:{node.lineno}: a relative import cannot ship; import from `{PACKAGE}.`")
    return found


def code_closure(module: str) -> dict[str, set[str]]:
    """`module` and every clipcond module it imports, transitively: {module: the names the others import from it}."""
    closure: dict[str, set[str]] = {module: set()}
    todo = [module]
    while todo:
        for node in _clipcond_imports(_module_file(todo.pop())):
            if node.module not in closure:
                closure[node.module] = set()
                todo.append(node.module)
            closure[node.module].update(alias.name for alias in node.names)
    return closure


def flat_name(module: str) -> str:
    """The file name a module ships under: its last name (diffusers copies one level of files)."""
    return module.rsplit(".", 1)[-1]


def _check_flat_names(closure: dict[str, set[str]], reserved: set[str]) -> None:
    seen: dict[str, str] = {}
    for module in closure:
        name = flat_name(module)
        if name in seen or name in reserved:
            other = seen.get(name, "the entry module")
            raise ValueError(f"cannot ship {module!r} and {other!r}: both would be {name}.py; rename one")
        seen[name] = module


def shipped_source(module: str) -> str:
    """The source of `module` with its clipcond imports made relative to the folder it ships in."""
    path = _module_file(module)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for node in _clipcond_imports(path):
        line = lines[node.lineno - 1]
        absolute = f"from {node.module} import"
        if absolute not in line:
            raise ValueError(f"{path}:{node.lineno}: expected {absolute!r} on one line")
        lines[node.lineno - 1] = line.replace(absolute, f"from .{flat_name(node.module)} import", 1)
    return SHIPPED_BY.format(module=module) + "".join(lines)


def entry_source(closure: dict[str, set[str]], module: str, class_name: str, what: str) -> str:
    """An entry module that imports, from each shipped module, the names the others use from it, and `class_name`
    from `module`."""
    lines = [ENTRY_DOC.format(what=what, class_name=class_name)]
    for other, names in sorted(closure.items()):
        names = sorted(names - {class_name}) if other == module else sorted(names)
        if names:
            lines.append(f"from .{flat_name(other)} import {', '.join(names)}  # noqa: F401\n")
    lines.append(f'from .{flat_name(module)} import {class_name}\n\n__all__ = ["{class_name}"]\n')
    return "".join(lines)


def write_code(folder: Path, cls: type, entry: str, what: str) -> None:
    """Write the modules of `cls` and the entry module `entry`.py that names it into `folder`."""
    closure = code_closure(cls.__module__)
    _check_flat_names(closure, {entry})
    folder.mkdir(parents=True, exist_ok=True)
    for module in closure:
        write_text_atomic(folder / f"{flat_name(module)}.py", shipped_source(module))
    write_text_atomic(folder / f"{entry}.py", entry_source(closure, cls.__module__, cls.__name__, what))


def ship_pipeline_code(pipeline, folder: str | os.PathLike) -> None:
    """Write the code of `pipeline` (a clipcond pipeline just saved with `save_pretrained` into `folder`) into the
    folder and name it in model_index.json, so that diffusers loads the folder without clipcond
    (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`)."""
    folder = Path(folder)
    cls = type(pipeline)
    if cls.__module__.split(".")[0] != PACKAGE:
        raise ValueError(f"`pipeline` must be one of clipcond's pipelines, got {cls.__module__}.{cls.__name__}")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no model_index.json: save the pipeline there first")
    index = json.loads(index_file.read_text(encoding="utf-8"))

    entry = f"pipeline_{flat_name(cls.__module__)}"
    write_code(folder, cls, entry, "pipeline")
    index["_class_name"] = [entry, cls.__name__]
    shipped_components = {}
    for name, component in pipeline.components.items():
        component_cls = type(component)
        if component is None or component_cls.__module__.split(".")[0] != PACKAGE:
            continue
        component_entry = f"modeling_{name}"
        write_code(folder / name, component_cls, component_entry, f"`{name}` component's")
        index[name] = [component_entry, component_cls.__name__]
        shipped_components[name] = [component_cls.__module__, component_cls.__name__]  # what clipcond loads
    if shipped_components:
        index[SHIPPED_COMPONENTS] = shipped_components
    write_text_atomic(index_file, json.dumps(index, indent=2, sort_keys=True) + "\n")
