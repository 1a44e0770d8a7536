"""Run Python code in a fresh process where clipcond cannot be imported: what a user of an exported or shipped run
folder has, with stock diffusers and transformers only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

# Any import of clipcond (or of one of its modules) then raises ImportError, even with clipcond installed.
BLOCK_CLIPCOND = 'import sys\nsys.modules["clipcond"] = None\n'


def run_without_clipcond(code: str, *args, env: dict[str, str] | None = None) -> str:
    """Run `code` with `args` as `sys.argv[1:]` (and `env` added to the environment); returns its stdout, and fails the
    test with the end of its stderr if it exits with an error."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_CLIPCOND + code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


STOCK_PIPELINE = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
folder, call, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
call["generator"] = torch.Generator().manual_seed(call.pop("seed"))
if "image" in call:
    call["image"] = torch.from_numpy(np.load(call["image"]))
result = pipe(**call, return_dict=False)[0]
np.save(out, result.numpy() if isinstance(result, torch.Tensor) else result)
print(type(pipe).__module__, type(pipe).__name__)
"""


def _call(pipe, call: dict, tmp_path) -> tuple[dict, dict]:
    """`call` (JSON-able, with `seed` for the generator and `image` a uint8 tensor) as the pipeline's keyword
    arguments here, and as the stock process reads them."""
    here, there = dict(call), dict(call)
    here["generator"] = torch.Generator().manual_seed(here.pop("seed"))
    if "image" in call:
        np.save(tmp_path / "image.npy", call["image"].numpy())
        there["image"] = str(tmp_path / "image.npy")
    return here, there


def assert_stock_diffusers_draws_the_same(folder, clipcond_class, tmp_path, **call) -> None:
    """Load `folder` with stock `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a process
    without clipcond, and with `clipcond_class.from_pretrained(folder)` here; both draw from `call` (fp32, CPU) and
    must agree to 1e-5, the stock one being the folder's own copy of the class."""
    pipe = clipcond_class.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is clipcond_class  # clipcond reads the folder as its own class, not the folder's copy
    here, there = _call(pipe, call, tmp_path)
    ours = pipe(**here, return_dict=False)[0]
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)

    # a modules cache of its own: diffusers must copy every shipped module from the folder, none is left over
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "stock.npy"
    stdout = run_without_clipcond(STOCK_PIPELINE, folder, json.dumps(there), out, env=env)
    assert stdout.split()[-2:] == [
        "diffusers_modules.local." + clipcond_class.__module__.rsplit(".", 1)[-1],
        clipcond_class.__name__,
    ]
    stock = np.load(out)
    assert stock.shape == ours.shape
    np.testing.assert_allclose(stock, ours, rtol=0, atol=1e-5)


def assert_ships_its_code(folder, entry: str, class_name: str, module_file: str) -> None:
    """A run folder (or a checkpoint's pretrained/) names its shipped pipeline code in model_index.json: the entry
    module `entry` and the class, both beside `module_file`, the pipeline's own module."""
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [entry, class_name]
    assert (folder / f"{entry}.py").is_file() and (folder / module_file).is_file()
