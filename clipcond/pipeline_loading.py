"""Loading a saved pipeline folder for the commands and evaluations that sample: which pipeline a folder holds
(`pipeline_class_name`), loading it on a device in a dtype (`load_pipeline`, `load_pretrained`), the samplers
(`DEFAULT_SAMPLER`; the `--scheduler` names, `SCHEDULER_CHOICES`, `SAVED_SCHEDULER` for a run's own, `use_scheduler`,
`scheduler_name`); and one component of a pipeline folder to train from
(`load_pretrained_component`: `--init-unet`, `--init-prior`).

The pipeline modules are imported inside the functions, so that a command's `--help` answers without diffusers.
"""

from __future__ import annotations

import json
import os

from clipcond.device import dtype_keyword, resolve_device, resolve_dtype
from clipcond.hub import local_files_only, looks_like_path, resolve_folder
from clipcond.runs import check_finished

# The keys of `clipcond.pipelines.text_to_image.SCHEDULERS`, spelled out so that `--help` needs no diffusers import.
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm", "dpm-sde", "euler", "euler-a", "unipc")
# The sampler the evaluations, the demo, the decoders' validation images and the web page draw with unless told
# otherwise: DPM-Solver++ (2M) in its SDE form (Lu et al. 2022), which adds fresh noise at every step, as DDPM does.
# The noise lets later steps correct what earlier ones got wrong (Karras et al. 2022, section 4), which a decoder
# trained for minutes needs: on the demo's decoders it draws fewer second objects than the deterministic solver
# (docs/lab-notes.md, "a stochastic sampler"; benchmarks/results/scheduler_steps.json).
DEFAULT_SAMPLER = "dpm-sde"
# The `--scheduler` choice that keeps the scheduler saved with a run (its training noise schedule, a DDPMScheduler).
SAVED_SCHEDULER = "saved"
SCHEDULER_CHOICES = (*SCHEDULER_NAMES, SAVED_SCHEDULER)

# The pipelines `load_pipeline` reads, by the `_class_name` of their model_index.json.
PIPELINE_CLASSES = ("TextToImagePipeline", "ImageVariationPipeline", "UnCLIPTextToImagePipeline")
# Those with an image-embedding decoder, which reads images (`clipcond vary`, `clipcond interpolate --images`).
IMAGE_PIPELINES = ("ImageVariationPipeline", "UnCLIPTextToImagePipeline")


def pipeline_folder(model: str | os.PathLike, flag: str = "--model") -> str:
    """The local folder of a pipeline argument: a path, which must exist, or a Hugging Face Hub id, resolved to its
    snapshot (see `clipcond.hub`)."""
    model = os.fspath(model)
    if looks_like_path(model) and not os.path.isdir(model):
        raise FileNotFoundError(f"`{flag}` {model!r} does not exist")
    return os.fspath(resolve_folder(model, flag, "pass a pipeline folder"))


def pipeline_class_name(model: str | os.PathLike, flag: str = "--model") -> str:
    """The `_class_name` in the model_index.json of a pipeline folder (or a Hub id's snapshot), checking that there is
    one."""
    model = pipeline_folder(model, flag)
    check_finished(model, f"`{flag}`")
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"`{flag}` {model!r} holds no model_index.json; expected a pipeline folder written with "
            "`save_pretrained` (as the training commands write it)"
        )
    try:
        with open(index, encoding="utf-8") as f:
            class_name = json.load(f).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"`{flag}` {model!r}: model_index.json is not a JSON object ({err})") from None
    # A folder that ships its code names [entry module, class name] (`clipcond.pipeline_code`).
    if isinstance(class_name, list) and len(class_name) == 2:
        class_name = class_name[1]
    return class_name if isinstance(class_name, str) else ""


def load_pipeline(
    model: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str = "fp32",
    scheduler: str | None = None,
    prior: str | os.PathLike | None = None,
    text_encoder: str | None = None,
    allow_clip_mismatch: bool = False,
    allow_encoder_mismatch: bool = False,
):
    """The pipeline in the folder `model` (and `prior`), on `device` in `dtype`, with `scheduler` (a `--scheduler`
    value) swapped in unless None or `SAVED_SCHEDULER`: a `TextToImagePipeline` (its encoder swapped for
    `text_encoder` if given), an `ImageVariationPipeline` (an image-embedding decoder run), or an
    `UnCLIPTextToImagePipeline` (a folder saved as one, or `model` a decoder run paired with `prior`). Errors name
    the command-line flags (`--model`, `--prior`, `--text-encoder`)."""
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    model = pipeline_folder(model)
    prior = None if prior is None else pipeline_folder(prior, "--prior")
    class_name = pipeline_class_name(model)
    if text_encoder and (prior is not None or class_name != "TextToImagePipeline"):
        raise ValueError(
            f"`--text-encoder` swaps the encoder of a text-to-image run, but `--model` {model!r} holds a "
            f"{class_name or 'pipeline of unknown class'}{' paired with --prior' if prior else ''}"
        )
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    load_kwargs = {"local_files_only": local_files_only(), dtype_keyword(): dtype}
    if prior is not None:
        from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

        if class_name != "ImageVariationPipeline":
            raise ValueError(
                f"`--prior` pairs a prior with an image-embedding decoder run, but `--model` {model!r} holds a "
                f"{class_name or 'pipeline of unknown class'}; pass the output folder of "
                "`clipcond train decoder --conditioning image-embedding`"
            )
        pipeline_class_name(prior, "--prior")
        pipe = UnCLIPTextToImagePipeline.from_runs(
            prior, model, allow_clip_mismatch=allow_clip_mismatch, **load_kwargs
        )
    elif class_name == "UnCLIPTextToImagePipeline":
        from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

        pipe = UnCLIPTextToImagePipeline.from_pretrained(model, **load_kwargs)
    elif class_name == "ImageVariationPipeline":
        from clipcond.pipelines.variation import ImageVariationPipeline

        pipe = ImageVariationPipeline.from_pretrained(model, **load_kwargs)
    elif class_name == "TextToImagePipeline" and text_encoder:
        from clipcond.encoders import load_text_to_image

        pipe = load_text_to_image(
            model, text_encoder, allow_encoder_mismatch=allow_encoder_mismatch, **{dtype_keyword(): dtype}
        )
    elif class_name == "TextToImagePipeline":
        pipe = TextToImagePipeline.from_pretrained(model, **load_kwargs)
    else:
        raise ValueError(
            f"`--model` {model!r} holds a {class_name or 'pipeline of unknown class'}; expected one of "
            f"{list(PIPELINE_CLASSES)} (the folders `clipcond train decoder` writes, or an unCLIP pipeline)"
        )
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:  # a diffusers that ignored the keyword
        pipe.to(dtype=dtype)
    return use_scheduler(pipe, scheduler)


def load_pretrained(pipeline_class, path: str | os.PathLike, device, dtype: str):
    """`pipeline_class.from_pretrained(path)` (Hub cache only when HF_HUB_OFFLINE is set) on `device` (a
    torch.device) in `dtype` ("fp32", "bf16" or "fp16", as `--dtype`)."""
    torch_dtype = resolve_dtype(dtype, device)
    pipe = pipeline_class.from_pretrained(
        path, local_files_only=local_files_only(), **{dtype_keyword(): torch_dtype}
    ).to(device)
    if pipe.unet.dtype != torch_dtype:  # a diffusers that ignored the keyword
        pipe.to(dtype=torch_dtype)
    return pipe


def chosen_scheduler(name: str | None) -> str | None:
    """A `--scheduler` value as `load_pipeline` takes it: None (keep the run's own) for `SAVED_SCHEDULER`."""
    return None if name == SAVED_SCHEDULER else name


def use_scheduler(pipe, name: str | None):
    """`pipe` with the scheduler `name` (a `--scheduler` value; None or `SAVED_SCHEDULER`: its own) swapped in, on
    the noise schedule of the one it has (`scheduler_from_name`)."""
    name = chosen_scheduler(name)
    if name is not None:
        from clipcond.pipelines.text_to_image import scheduler_from_name

        pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    return pipe


def scheduler_name(scheduler) -> str:
    """The `--scheduler` name of a scheduler, or its class name when it is none of them."""
    from clipcond.pipelines.text_to_image import SCHEDULER_OPTIONS, SCHEDULERS

    def is_named(name: str) -> bool:
        options = SCHEDULER_OPTIONS.get(name, {})
        return type(scheduler) is SCHEDULERS[name] and all(scheduler.config.get(k) == v for k, v in options.items())

    names = [name for name in SCHEDULERS if is_named(name)]
    return names[0] if names else type(scheduler).__name__


def is_unclip(pipe) -> bool:
    return type(pipe).__name__ == "UnCLIPTextToImagePipeline"


def check_reads_images(class_name: str, model: str | os.PathLike) -> None:
    """Refuse a pipeline class without an image-embedding decoder (`model`: the folder, for the message)."""
    if class_name not in IMAGE_PIPELINES:
        raise ValueError(
            f"`--model` {os.fspath(model)!r} holds a {class_name or 'pipeline of unknown class'}, which does "
            "not read images; pass the output folder of `clipcond train decoder --conditioning image-embedding`"
        )


def decoder_of(pipe, model: str | os.PathLike):
    """The image-embedding decoder inside `pipe` (loaded from `model`): itself, or an unCLIP pipeline's decoder."""
    check_reads_images(type(pipe).__name__, model)
    return pipe.decoder_pipeline if type(pipe).__name__ == "UnCLIPTextToImagePipeline" else pipe


def load_pretrained_component(path: str | os.PathLike, subfolder: str, cls: type, what: str, hint: str):
    """A diffusers model of class `cls` to train from, and the folder its weights came from: `path` is its own folder,
    a pipeline folder holding it in `subfolder` (Stable Diffusion's unet/, Karlo's prior/) or a Hugging Face Hub id
    of either (`clipcond.hub`). Errors name the argument `what` and the value, and end with `hint` (what to pass)."""
    root = resolve_folder(path, what, hint)
    folder = root / subfolder if (root / subfolder / "config.json").is_file() else root
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"`{what}` {str(root)!r} holds no config.json (nor {subfolder}/config.json); pass a {cls.__name__} folder"
        )
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name != cls.__name__:
        raise ValueError(f"`{what}` {str(folder)!r} holds a {class_name!r}; expected a {cls.__name__} folder")
    return cls.from_pretrained(folder, local_files_only=local_files_only()), folder
