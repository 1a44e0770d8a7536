"""`clipcond export stable-diffusion RUN OUT`: a text-to-image run as a stock Stable Diffusion folder.

    clipcond train decoder --vae runs/vae --no-mask-text-padding --clip runs/clip --data shapes --output-dir runs/ldm
    clipcond export stable-diffusion runs/ldm exports/ldm
    python -c "from diffusers import StableDiffusionPipeline; StableDiffusionPipeline.from_pretrained('exports/ldm')"

The folder is what diffusers' `StableDiffusionPipeline.save_pretrained` writes (`model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`; no safety checker), so a process without clipcond loads it and, for
the same prompt, seed, scheduler and steps, draws the images `clipcond generate` draws from the run. That holds for
the runs whose conditioning is Stable Diffusion's: latent space (`--vae`), the text encoder's unmasked token states
(`--no-mask-text-padding`) and nothing else (no `--pooled-text`); other runs are refused with the reason. The text
encoder is saved as a `CLIPTextModel` (Stable Diffusion reads its `last_hidden_state`; the projection is dropped)
and the tokenizer pads to the encoder's context. The folder is written beside OUT and renamed into place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clipcond.help_formatter import HelpFormatter
from clipcond.pipeline_loading import pipeline_class_name
from clipcond.storage import check_output_dir, new_folder


def check_exportable(pipe, run: str | os.PathLike) -> None:
    """Refuse, with the reasons, a text-to-image pipeline that stock `StableDiffusionPipeline` would run
    differently."""
    from transformers import CLIPTextConfig

    reasons = []
    if pipe.vae is None:
        reasons.append("it denoises pixels; train it on a VAE's latents (`--vae`)")
    if pipe.config.mask_text_padding:
        reasons.append("it masks the captions' padding; train it with `--no-mask-text-padding`")
    if pipe.unet.config.class_embed_type is not None:
        reasons.append("its UNet also reads the pooled text embedding (`--pooled-text`)")
    if not isinstance(pipe.text_encoder.config, CLIPTextConfig):
        reasons.append(f"its text encoder is a {type(pipe.text_encoder).__name__}, not a CLIP text encoder")
    reasons += _scheduler_differences(pipe.scheduler.config)
    if reasons:
        raise ValueError(
            f"`RUN` {os.fspath(run)!r} cannot run in stock StableDiffusionPipeline: " + "; ".join(reasons)
        )


def _scheduler_differences(config) -> list[str]:
    """What `StableDiffusionPipeline.__init__` would change in this scheduler config (it turns `clip_sample` off and
    sets `steps_offset` to 1, which moves the timesteps of "leading" spacing)."""
    differences = []
    if config.get("clip_sample", False):
        differences.append(
            f"its scheduler clips the predicted sample to +-{config.get('clip_sample_range', 1.0)} (a pixel-space "
            "setting, which Stable Diffusion turns off)"
        )
    if config.get("timestep_spacing") == "leading" and config.get("steps_offset", 1) != 1:
        differences.append("its scheduler's leading timesteps have steps_offset 0 (Stable Diffusion makes it 1)")
    return differences


def export_stable_diffusion(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the text-to-image run folder `run` as a Stable Diffusion folder at `out` (which must not exist)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from clipcond.pipelines.text_to_image import TextToImagePipeline
    from clipcond.text_encoding import context_length

    run, out = Path(run), Path(out)
    class_name = pipeline_class_name(run, "RUN")  # before loading: another pipeline fails inside diffusers
    if class_name != "TextToImagePipeline":
        raise ValueError(
            f"`RUN` {str(run)!r} cannot run in stock StableDiffusionPipeline: it holds {class_name}, not a "
            "text-to-image decoder (TextToImagePipeline)"
        )
    if out.exists():
        raise FileExistsError(f"`OUT` {str(out)!r} exists; pass a new folder")
    pipe = TextToImagePipeline.from_pretrained(run)
    check_exportable(pipe, run)
    if pipe.scheduler.config.get("timestep_spacing") != "leading":
        pipe.scheduler.register_to_config(steps_offset=1)  # unused by this spacing; SD warns when it is not 1
    tokenizer = pipe.tokenizer
    tokenizer.model_max_length = context_length(pipe.text_encoder, tokenizer)  # what SD pads to
    stock = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=CLIPTextModel.from_pretrained(run / "text_encoder"),  # the same tower, without the projection
        tokenizer=tokenizer,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with new_folder(out) as scratch:
        stock.save_pretrained(scratch, safe_serialization=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond export stable-diffusion",
        description="Write a text-to-image decoder run (latent space, unmasked text states) as a folder that stock "
        "diffusers loads with StableDiffusionPipeline.from_pretrained, without clipcond.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="a `clipcond train decoder` run folder")
    parser.add_argument("out", metavar="OUT", help="the new folder (must not exist)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out, "OUT")
    out = export_stable_diffusion(args.run, args.out)
    print(f"wrote {out}: load it with diffusers.StableDiffusionPipeline.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
