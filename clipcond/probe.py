"""`clipcond probe`: compositional minimal-pair probes of a CLIP, and judged prompts of the generators.

    clipcond probe --clip runs/clip --data data/shapes --output-dir probes
    clipcond probe --clip runs/clip --model runs/decoder --prior runs/prior --decoder runs/unclip_decoder \\
        --data data/shapes --output-dir probes

CLIP zero-shot: count, relation, binding, position and size pairs (`clipcond.evaluation.probes`), on renders of the
shapes generator (seen and held-out compositions) or, with `--source metadata`, on the images of a split whose
metadata.jsonl carries the shapes fields. With `--model` (a text-to-image decoder: the Stable Diffusion path) and/or
`--prior` + `--decoder` (the DALL-E 2 path), prompts of each kind are drawn and read by the scene reader. With
`--captioner`, each probe's field is read back from the captioner's captions of the pairs' images, written as
`clipcond caption` writes them (the best of several candidates, sampled from one generator over the probes).
Writes OUT/probes.json, OUT/probes.md, a bar chart per probe and OUT/examples.png.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from clipcond.evaluation.arguments import check_at_least
from clipcond.finite import finite_float
from clipcond.pipeline_loading import DEFAULT_SAMPLER, SCHEDULER_CHOICES
from clipcond.sampling_options import add_prior_sampling_args
from clipcond.storage import check_output_dir

DEFAULT_NUM_PAIRS = 100
DEFAULT_NUM_PROMPTS = 8
DEFAULT_IMAGES_PER_PROMPT = 2
DEFAULT_INFERENCE_STEPS = 20


def _add_generator_args(parser: argparse.ArgumentParser) -> None:
    """How the generators draw each probe's prompts: prompts, images, steps, guidance, sampler, batch."""
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=DEFAULT_NUM_PROMPTS,
        help=f"generator prompts per kind and group (default {DEFAULT_NUM_PROMPTS})",
    )
    parser.add_argument(
        "--images-per-prompt",
        type=int,
        default=DEFAULT_IMAGES_PER_PROMPT,
        help=f"images per generator prompt (default {DEFAULT_IMAGES_PER_PROMPT})",
    )
    parser.add_argument(
        "--num-inference-steps",
        type=int,
        default=DEFAULT_INFERENCE_STEPS,
        help=f"decoder denoising steps (default {DEFAULT_INFERENCE_STEPS})",
    )
    parser.add_argument(
        "--guidance-scale", type=finite_float, default=None, help="decoder guidance (default: each path's default)"
    )
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULER_CHOICES,
        default=DEFAULT_SAMPLER,
        help=f"the decoders' sampler (default {DEFAULT_SAMPLER}; 'saved': the run's own)",
    )
    add_prior_sampling_args(parser)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per pipeline or captioner call (default 32)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond probe",
        description=(
            "Compositional probes: a CLIP's zero-shot choice between minimal-pair captions (count, relation, "
            "binding, position, size; seen and held-out compositions), and what the generators draw for prompts of "
            "each kind (count, relation, binding), read by a scene reader. Accuracy with a 95% interval beside "
            "chance. Writes OUT/probes.json, OUT/probes.md and a figure per probe."
        ),
    )
    parser.add_argument("--clip", required=True, metavar="RUN", help="CLIP run folder (`clipcond train clip`)")
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="the shapes data root (or --source metadata data)"
    )
    parser.add_argument("--output-dir", required=True, metavar="OUT", help="where the report goes")
    parser.add_argument("--model", metavar="DEC", help="text-to-image decoder run: probe the Stable Diffusion path")
    parser.add_argument("--prior", metavar="PRIOR", help="prior run (with --decoder): probe the DALL-E 2 path")
    parser.add_argument("--decoder", metavar="UNCLIP_DEC", help="image-embedding decoder run (with --prior)")
    parser.add_argument(
        "--captioner",
        metavar="CAP",
        help="captioner run (`clipcond train captioner`): read each probe's field back from its captions of the "
        "pairs' images",
    )
    parser.add_argument(
        "--captioner-best-of",
        type=int,
        default=None,
        metavar="N",
        help="the captions read with --captioner: the best of N candidates per image, as `clipcond caption "
        "--best-of N` writes them, sampled from a generator of --seed (default: `clipcond caption`'s; 1: greedy)",
    )
    parser.add_argument(
        "--num-pairs",
        type=int,
        default=DEFAULT_NUM_PAIRS,
        help=f"pairs per probe and group (default {DEFAULT_NUM_PAIRS})",
    )
    parser.add_argument(
        "--source",
        choices=("render", "metadata"),
        default="render",
        help="render pairs with the shapes generator (default), or read them from --split's metadata.jsonl",
    )
    parser.add_argument("--split", default="test", help="the split of --source metadata (default test)")
    _add_generator_args(parser)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the pairs, prompts, images and the captioner's candidates (default 0)",
    )
    parser.add_argument("--judge-cache-dir", metavar="DIR", help="where the attribute judge is cached")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-clip-mismatch", action="store_true", help="pair a prior and decoder of other CLIPs")
    args = parser.parse_args(argv)
    counts = ("num_pairs", "num_prompts", "images_per_prompt", "num_inference_steps", "prior_num_inference_steps")
    check_at_least(args, 1, *counts, "batch_size")
    if args.captioner_best_of is not None:
        check_at_least(args, 1, "captioner_best_of", note=" (1: greedy decoding)")
        if args.captioner is None:
            raise ValueError(
                f"`--captioner-best-of` {args.captioner_best_of} needs `--captioner` (the captions it picks)"
            )
    check_at_least(args, 1, "prior_guidance_scale", note=" (1: no guidance)")
    if args.guidance_scale is not None:
        check_at_least(args, 1, "guidance_scale", note=" (1: no guidance)")
    if (args.prior is None) != (args.decoder is None):
        given, missing = ("--prior", "--decoder") if args.decoder is None else ("--decoder", "--prior")
        raise ValueError(f"`{given}` {getattr(args, given[2:])!r} needs `{missing}` too (the DALL-E 2 path is both)")
    return args


def _check_inputs(args: argparse.Namespace) -> None:
    given = (("--clip", args.clip), ("--data", args.data), ("--model", args.model), ("--captioner", args.captioner))
    for flag, path in given:
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"`{flag}` {path!r} does not exist")
    for flag, path in (("--model", args.model), ("--prior", args.prior), ("--decoder", args.decoder)):
        if path is not None and not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(f"`{flag}` {path!r} holds no model_index.json; pass a pipeline run folder")
    if args.source == "metadata" and not (Path(args.data) / args.split / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"`--split` {args.split!r}: {args.data}/{args.split}/metadata.jsonl does not exist")


def _generator_fns(args, device) -> dict:
    """{"stable_diffusion" / "dalle2": (generate fn, settings)} for the paths given."""
    from clipcond.evaluation import unclip
    from clipcond.evaluation.sampling import pipeline_generate_fn
    from clipcond.hub import local_files_only
    from clipcond.pipeline_loading import load_pretrained, use_scheduler
    from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE, DEFAULT_TEXT_GUIDANCE_SCALE

    fns = {}
    if args.model is not None:
        from clipcond.pipelines.text_to_image import TextToImagePipeline

        pipe = use_scheduler(load_pretrained(TextToImagePipeline, args.model, device, "fp32"), args.scheduler)
        pipe.set_progress_bar_config(disable=True)
        scale = args.guidance_scale if args.guidance_scale is not None else DEFAULT_TEXT_GUIDANCE_SCALE
        fns["stable_diffusion"] = (pipeline_generate_fn(pipe, args.num_inference_steps), scale)
    if args.prior is not None:
        from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

        pipe = UnCLIPTextToImagePipeline.from_runs(
            args.prior, args.decoder, allow_clip_mismatch=args.allow_clip_mismatch, local_files_only=local_files_only()
        ).to(device)
        use_scheduler(pipe, args.scheduler)  # the decoder's; the prior keeps DDPM
        pipe.set_progress_bar_config(disable=True)
        scale = args.guidance_scale if args.guidance_scale is not None else DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE
        sampling = unclip.DecoderSampling(guidance_scale=scale, num_inference_steps=args.num_inference_steps)
        prior = unclip.PriorSettings(args.prior_guidance_scale, args.prior_num_inference_steps)
        fns["dalle2"] = (unclip.unclip_generate_fn(pipe, sampling, prior), scale)
    return fns


def _check_data(args: argparse.Namespace, info: dict | None) -> None:
    from clipcond.data.shapes import is_shapes_data

    if args.source == "render" and not is_shapes_data(info):
        raise ValueError(
            f"`--data` {args.data!r} is not the built-in shapes data (no clipcond-shapes dataset_info.json); "
            "pass `--source metadata` for a folder whose metadata carries the shapes fields"
        )
    if (args.model or args.prior) and not is_shapes_data(info):
        raise ValueError(
            f"`--data` {args.data!r}: the generator probes need the built-in shapes data (its resolution)"
        )


def _captioner_probes(args: argparse.Namespace, device, pairs: dict, resolution: int, best_of: int) -> dict:
    """Per probe, the share of the pairs' images whose caption by `--captioner`, the best of `best_of` candidates
    sampled from a generator of `--seed`, `--batch-size` images at a time, states the probed field as the right
    caption does (`clipcond.evaluation.probes.captioner_figures`)."""
    import torch

    from clipcond.evaluation import probes
    from clipcond.models.captioner import Captioner
    from clipcond.runs import check_finished

    check_finished(args.captioner, "`--captioner`")
    captioner = Captioner.from_pretrained(args.captioner, what="--captioner").to(device)
    generator = torch.Generator(device=captioner.device).manual_seed(args.seed)
    return probes.captioner_figures(
        lambda images: captioner.generate_best_of(images, best_of=best_of, generator=generator),
        pairs,
        resolution,
        batch_size=args.batch_size,
    )


def _generator_probes(args: argparse.Namespace, device, resolution: int, held_out: list[str]) -> dict:
    """The report's generator sections: prompts of each kind drawn by each path given, read by the scene reader
    beside the reader's own accuracy on renders of the same prompts."""
    from tqdm.auto import tqdm

    from clipcond.evaluation import probes
    from clipcond.evaluation.judge import load_or_train_judge
    from clipcond.evaluation.sampling import draw_prompts

    generators = _generator_fns(args, device)
    judge = load_or_train_judge(resolution, cache_dir=args.judge_cache_dir, device=device)
    prompts = probes.generator_prompts(args.num_prompts, held_out=held_out, seed=args.seed)
    reader, baseline = probes.reader_figures(prompts, judge, resolution, seed=args.seed)
    texts = [p.text for p in prompts]
    figures = {}
    for key, (generate, scale) in generators.items():
        with tqdm(total=len(texts) * args.images_per_prompt, desc=f"probe {key}", unit="image") as bar:
            images = draw_prompts(
                generate, texts, args.images_per_prompt, scale, seed=args.seed, batch_size=args.batch_size, bar=bar
            )
        figures[key] = probes.generator_figures(prompts, images, judge, args.images_per_prompt, baseline)
    settings = {
        "model": args.model,
        "prior": args.prior,
        "decoder": args.decoder,
        "num_prompts": args.num_prompts,
        "images_per_prompt": args.images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
        "scheduler": args.scheduler,
        "guidance_scale": {key: scale for key, (_, scale) in generators.items()},
    }
    reader_section = {"accuracy": reader, "baseline": baseline}
    return {"reader": reader_section, "judge": judge.summary(), "generators": figures, "settings": settings}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check the inputs before the slow imports and loads
    _check_inputs(args)
    check_output_dir(args.output_dir, "--output-dir")
    from clipcond.data.shapes import load_dataset_info

    info = load_dataset_info(args.data)
    _check_data(args, info)

    from clipcond.device import resolve_device
    from clipcond.evaluation.probe_report import clip_verdict, run_clip_probes, write_report

    start = time.perf_counter()
    device = resolve_device(args.device)
    held_out = list((info or {}).get("held_out") or [])
    resolution = int((info or {}).get("resolution") or 0)
    output_dir = Path(args.output_dir)

    # 2. minimal pairs and the CLIP's choices
    report, pairs = run_clip_probes(
        args.clip,
        args.data,
        output_dir,
        args.num_pairs,
        args.seed,
        source=args.source,
        split=args.split,
        device=device,
    )
    if args.captioner:
        from clipcond.models.captioner import CAPTION_BEST_OF  # here, not at parsing: `--help` needs no diffusers

        best_of = CAPTION_BEST_OF if args.captioner_best_of is None else args.captioner_best_of
        report["captioner"] = _captioner_probes(args, device, pairs, resolution, best_of)
        report["settings"].update(captioner=str(args.captioner), captioner_best_of=best_of)

    # 3. the generators: prompts of each kind, drawn, read by the scene reader
    if args.model or args.prior:
        generator = _generator_probes(args, device, resolution, held_out)
        report["settings"].update(generator.pop("settings"))
        report.update(generator)

    report["seconds"] = time.perf_counter() - start
    write_report(report, output_dir)
    print(clip_verdict(report["clip"], report["clip_recipe"]) or "no binding or relation pairs")
    print(f"wrote {output_dir / 'probes.md'} in {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
