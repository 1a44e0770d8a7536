"""Where a model argument's files are: a local folder, or a Hugging Face Hub id resolved to its cached snapshot.

Every loader in clipcond reads folders. An argument that looks like a path (absolute, `./`, `~`, more than one `/`,
an existing folder, or `a/b` where the folder `a` exists) must be an existing folder, with the message each caller
gives; any other string is a Hub id (`openai/clip-vit-base-patch32`), fetched with
`huggingface_hub.snapshot_download` into the Hub cache, or read from that cache alone when `HF_HUB_OFFLINE` is set
(`local_files_only`, the one place that decides it).
"""

from __future__ import annotations

import os
from pathlib import Path

# Weight formats clipcond never reads (it loads safetensors only), so a Hub download skips them.
# Diffusers' fp16 and non-EMA variants (`*.fp16.safetensors`) beside the default weights are skipped too.
SKIPPED_FILES = (
    "*.fp16.safetensors",
    "*.non_ema.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.msgpack",
    "*.h5",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.ot",
)


def local_files_only() -> bool:
    """Whether loaders must stay off the network: True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set.

    Read from `huggingface_hub.constants` at each call, so that it is the value the Hub client itself obeys.
    """
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def looks_like_path(ref: str | os.PathLike) -> bool:
    """Whether `ref` names a local path rather than a Hub id (`org/name` or `name`)."""
    text = os.fspath(ref)
    if os.path.exists(text) or os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text:
        return True
    if text.count("/") > 1 or not text or text.endswith("/"):
        return True
    if "/" in text and os.path.isdir(text.split("/", 1)[0]):  # `runs/unet` beside an existing `runs/`: a path
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def check_local_folder(ref: str | os.PathLike, what: str, hint: str = "") -> bool:
    """Whether `ref` is a local folder; a `FileNotFoundError` naming `what`, the value and `hint` when it looks like a
    path but is none. False for a Hub id: checked when it is loaded. No network use: argument checks call it."""
    text = os.fspath(ref)
    if not looks_like_path(text):
        return False
    if not os.path.isdir(text):
        raise FileNotFoundError(f"`{what}` folder {text!r} does not exist" + (f"; {hint}" if hint else ""))
    return True


def resolve_folder(ref: str | os.PathLike, what: str, hint: str = "") -> Path:
    """The local folder of `ref` (the value of the argument `what`): `ref` itself when it looks like a path, which
    must then exist (`FileNotFoundError` naming `what`, the value and `hint`), else the snapshot of the Hub id `ref`
    (downloaded unless `HF_HUB_OFFLINE` is set, in which case it must be in the cache). Weight formats other than
    safetensors are not downloaded (`SKIPPED_FILES`)."""
    text = os.fspath(ref)
    suffix = f"; {hint}" if hint else ""
    if check_local_folder(text, what, hint):
        return Path(text)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = local_files_only()
    try:
        folder = snapshot_download(text, local_files_only=offline, ignore_patterns=list(SKIPPED_FILES))
    except LocalEntryNotFoundError as err:
        hub = "not in the Hub cache, and HF_HUB_OFFLINE is set" if offline else f"not reachable ({err})"
        raise FileNotFoundError(
            f"`{what}` folder {text!r} does not exist, and as a Hugging Face Hub id {text!r} is {hub}{suffix}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"`{what}` folder {text!r} does not exist, and the Hugging Face Hub has no model {text!r} ({err}){suffix}"
        ) from None
    return Path(folder)
