"""The report of `clipcond demo`: `report.md` (what a reader sees: tables of the figures, the sample grid, the time
of every stage) and `report.json` (the same figures for programs), rendered from the report dict that
`clipcond.demo` assembles from its stages, and the one-line summary the command prints.

The report dict holds "data", "clip" / "decoder" (the training summaries), "clip_eval", "generation", "samples",
with `--dalle2` "prior", "unclip_decoder", "unclip_eval" and "dalle2_table", with `--latent` "vae", "vae_eval",
"latent_decoder" and "latent_generation", then "seconds", "timings" and "machine".
"""

from __future__ import annotations

from pathlib import Path

from clipcond.finite import finite_or_null
from clipcond.storage import dumps_json, write_json_atomic


def dalle2_table(generation: dict, unclip_eval: dict) -> dict:
    """{"seen" | "heldout": {path: {"colour", "shape"}}}: the judged accuracies of the three ways to draw, side by
    side (the Stable Diffusion path and text-to-image through the prior at the default guidance)."""
    paths = {
        "stable_diffusion_text_to_image": generation,
        "dalle2_text_to_image": unclip_eval["text_to_image"],
        "dalle2_variations": unclip_eval["variations"],
    }
    return {
        group: {
            name: {"colour": figures[f"colour_accuracy_{group}"], "shape": figures[f"shape_accuracy_{group}"]}
            for name, figures in paths.items()
        }
        for group in ("seen", "heldout")
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ema_decay(ema: dict) -> str:
    """The EMA's decay as a run record gives it: its last update's (records of older runs give the bound only)."""
    if "last_decay" not in ema:
        return f"decay at most {_num(ema['decay'], 4)}"
    return f"decay {_num(ema['last_decay'], 4)} at the end, at most {_num(ema['decay'], 4)}"


def _precision(mixed_precision: str | None) -> str:
    return "fp32" if mixed_precision in (None, "no") else mixed_precision


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _diversity_sentence(generation: dict) -> str:
    """How different a prompt's images are from each other, beside real images of the class (1 - cosine in CLIP
    space; RMS pixel difference)."""
    parts = []
    for key, figures in generation["guidance"].items():
        d = figures.get("diversity")
        if d:
            parts.append(
                f"guidance {float(key):g}: CLIP {_num(d['clip'])} (real {_num(d['clip_real'])}), pixels "
                f"{_num(d['pixels'])} (real {_num(d['pixels_real'])})"
            )
    if not parts:
        return ""
    return (
        "Diversity, the mean distance between two images of one prompt beside the same for renders of its class "
        "(a model that draws every seed alike scores near 0): " + "; ".join(parts) + "."
    )


def _distance_sentence(distance: dict | None) -> str:
    """How far variations are from their sources, beside an unrelated source and a copy."""
    if not distance:
        return ""
    to, other = distance["to_source"], distance["to_unrelated_sources"]
    clip = f"CLIP {_num(to['clip'])} against {_num(other['clip'])}, " if to.get("clip") is not None else ""
    return (
        f"Distance of a variation to its source: {clip}pixels {_num(to['pixels'])} against "
        f"{_num(other['pixels'])} for the sources of unrelated classes (a copy: 0)."
    )


def _not_one_object(figures: dict, group: str) -> str:
    """The share of a group's images the judge did not see one object in: "blank / several / unrecognisable"."""
    shares = (figures.get("outcomes") or {}).get(group)
    if not shares:
        return "–"
    return " / ".join(_pct(shares[outcome]) for outcome in ("blank", "several", "unrecognisable"))


def _generation_table(generation: dict) -> list[str]:
    """The judged figures of a text-to-image decoder, a row per guidance scale."""
    return [
        "| guidance | colour (seen) | shape (seen) | both (seen) | colour (held-out) | shape (held-out) | "
        "both (held-out) | blank / several / unrecognisable (seen) | (held-out) | CLIP score | FD (CLIP features) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *_generation_rows(generation),
    ]


def _generation_rows(generation: dict) -> list[str]:
    rows = []
    for key, g in generation["guidance"].items():
        rows.append(
            f"| {float(key):g} | {_pct(g['colour_accuracy_seen'])} | {_pct(g['shape_accuracy_seen'])} | "
            f"{_pct(g['both_accuracy_seen'])} | {_pct(g['colour_accuracy_heldout'])} | "
            f"{_pct(g['shape_accuracy_heldout'])} | {_pct(g['both_accuracy_heldout'])} | "
            f"{_not_one_object(g, 'seen')} | {_not_one_object(g, 'heldout')} | "
            f"{_num(g['clip_score'])} | {_num(g['fd_clip'], 2)} |"
        )
    return rows


def _dalle2_lines(report: dict) -> list[str]:
    """The report's "DALL-E 2 path" section (empty without `--dalle2`)."""
    if "unclip_eval" not in report:
        return []
    prior, decoder, evaluation = report["prior"], report["unclip_decoder"], report["unclip_eval"]
    cosine, variations, t2i = evaluation["prior"], evaluation["variations"], evaluation["text_to_image"]
    settings = evaluation["settings"]
    table = report["dalle2_table"]
    columns = ("stable_diffusion_text_to_image", "dalle2_text_to_image", "dalle2_variations")
    rows = [
        f"| {label} | "
        + " | ".join(f"{_pct(table[group][c]['colour'])} | {_pct(table[group][c]['shape'])}" for c in columns)
        + " |"
        for group, label in (("seen", "seen"), ("heldout", "held-out"))
    ]
    return [
        "## DALL-E 2 path",
        "",
        f"Prior `{prior['model']}` ({prior['parameters'] / 1e6:.2f} M parameters) from the frozen CLIP's text to its "
        f"image embedding: {prior['steps']} steps of batch {prior['train_batch_size']}, learning rate "
        f"{prior['learning_rate']:g}, final loss {_num(prior['final_loss'], 4)}. Decoder UNet `{decoder['model']}` "
        f"({decoder['parameters'] / 1e6:.2f} M parameters) on the CLIP image embedding ({decoder['embedding_tokens']} "
        f"context tokens), {_pixel_space(decoder.get('space_to_depth', 1))}: {decoder['steps']} steps of batch "
        f"{decoder['train_batch_size']}, learning rate "
        f"{decoder['learning_rate']:g}, final loss {_num(decoder['final_loss'], 4)}.",
        "",
        f"The prior's image embeddings against the true ones of the first {cosine['num_captions']} test captions "
        f"(guidance {cosine['guidance_scale']:g}, {cosine['num_inference_steps']} DDPM steps): mean cosine",
        "",
        "| prior | text-embedding baseline | random-image baseline | prior (seen) | prior (held-out) | "
        "zero-shot top-1 of the prior's (seen / held-out) | of the true images' |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {_num(cosine['cosine_predicted'])} | {_num(cosine['cosine_text_baseline'])} | "
        f"{_num(cosine['cosine_random_baseline'])} | {_num(cosine['cosine_predicted_seen'])} | "
        f"{_num(cosine['cosine_predicted_heldout'])} | {_pct(cosine['zero_shot_top1_predicted_seen'])} / "
        f"{_pct(cosine['zero_shot_top1_predicted_heldout'])} | {_pct(cosine['zero_shot_top1_true_image_seen'])} / "
        f"{_pct(cosine['zero_shot_top1_true_image_heldout'])} |",
        "",
        "Judged colour and shape accuracy of the three ways to draw (decoder guidance "
        f"{settings['guidance_scale']:g}, on the image-embedding decoder's steps from "
        f"{settings.get('guidance_start', 0.0):.0%} to {settings.get('guidance_end', 1.0):.0%} only; "
        f"{t2i['settings']['scheduler']} {settings['num_inference_steps']} steps; "
        f"the prior at guidance {settings['prior_guidance_scale']:g}, {settings['prior_num_inference_steps']} steps). "
        f"Text-to-image: {report['generation']['settings']['num_images_per_prompt']} (Stable Diffusion path) and "
        f"{settings['images_per_prompt']} (through the prior) images per colour-shape prompt, judged against the "
        f"prompt. Variations: {settings['variations_per_source']} of each of {settings['sources_per_class']} "
        "one-object test image(s) per class, judged against the source's colour and shape.",
        "",
        "| compositions | SD path: colour | SD path: shape | DALL-E 2 (prior): colour | DALL-E 2 (prior): shape | "
        "variations: colour | variations: shape |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"The judge on the variations' sources themselves (what an exact copy scores): colour "
        f"{_pct(variations['source_colour_accuracy'])}, shape {_pct(variations['source_shape_accuracy'])}. "
        + _distance_sentence(variations.get("distance")),
        "",
        "Variations (a row per source: the source, then its variations):",
        "",
        "![variations](unclip_eval/variations/grid.png)",
        "",
        f"Judged grid of text-to-image through the prior: "
        f"`unclip_eval/text_to_image/grid_guidance_{float(t2i['guidance_scale'])}.png`.",
        "",
    ]


def _dalle2_headline(report: dict) -> dict:
    """The DALL-E 2 figures of the printed line: the prior's cosine beside its baselines, and the table."""
    cosine = report["unclip_eval"]["prior"]
    keys = ("cosine_predicted", "cosine_text_baseline", "cosine_random_baseline")
    rounded = {k: None if cosine[k] is None else round(cosine[k], 4) for k in keys}
    table = {
        group: {
            path: {k: None if v is None else round(v, 4) for k, v in figures.items()} for path, figures in row.items()
        }
        for group, row in report["dalle2_table"].items()
    }
    return {**rounded, **table}


def _latent_headline(report: dict) -> dict:
    """The latent path's figures in the printed summary line: reconstruction PSNR and the judged accuracies."""
    generation = report["latent_generation"]
    return {"vae_psnr": round(report["vae_eval"]["psnr"], 2), **_judged_headline(generation)}


def _judged_headline(generation: dict) -> dict:
    """A decoder's judged accuracies, seen and held-out, rounded for the summary line."""
    keys = ("colour_accuracy_seen", "shape_accuracy_seen", "colour_accuracy_heldout", "shape_accuracy_heldout")
    return {key: None if generation[key] is None else round(generation[key], 4) for key in keys}


def _intro_lines(report: dict) -> list[str]:
    held_out = ", ".join(report["data"]["held_out"]) or "none"
    lines = [
        "# clipcond demo report",
        "",
        f"Data: {report['data']['num_train']} train / {report['data']['num_test']} test images, held out: {held_out}. "
        f"Recipe: {report.get('recipe', 'cpu')} (on {report['machine'].get('device', 'cpu')}).",
        "",
    ]
    if report.get("quick"):
        lines.insert(2, "**Quick mode: tiny budgets; these figures only show that the plumbing works.**\n")
    return lines


def _clip_lines(report: dict) -> list[str]:
    """The "CLIP" section: its training and its zero-shot and retrieval figures."""
    clip, training = report["clip_eval"], report["clip"]
    return [
        "## CLIP",
        "",
        f"CLIP `{training['model']}`, contrastive: {training['steps']} steps of batch {training['train_batch_size']} "
        f"({training['samples_seen']} pairs), learning rate {training['learning_rate']:g}, precision "
        f"{_precision(training['mixed_precision'])}; "
        f"final loss {_num(training['final_loss'], 4)}, logit scale {_num(training['logit_scale'], 2)}.",
        "",
        "| zero-shot top-1 (seen) | zero-shot top-1 (held-out) | overall | image→text R@1 | text→image R@1 |",
        "| --- | --- | --- | --- | --- |",
        f"| {_pct(clip['zero_shot_top1_seen'])} | {_pct(clip['zero_shot_top1_heldout'])} | "
        f"{_pct(clip['zero_shot_top1'])} | {_pct(clip['image_to_text_R@1'])} | {_pct(clip['text_to_image_R@1'])} |",
        "",
        "![confusion matrix](clip/eval/confusion_matrix.png)",
        "",
    ]


def _probe_lines(report: dict) -> list[str]:
    """The "Compositional probes" section: the CLIP's minimal pairs (`clipcond probe`), when the stage ran."""
    probe = report.get("probe")
    if not probe:
        return []
    return [
        "## Compositional probes (CLIP)",
        "",
        "`clipcond probe` without the generators; `clipcond probe --model decoder` adds the decoder's prompts. "
        "Figures and example pairs: [probe/probes.md](probe/probes.md).",
        "",
        probe["markdown"],  # `clipcond.evaluation.probe_report.markdown_tables`, rendered by the stage
    ]


def _pixel_space(space_to_depth: int) -> str:
    """How the pixel decoder's UNet sees the images: as they are, or as `--space-to-depth` blocks."""
    if space_to_depth == 1:
        return "denoising the pixels"
    side = space_to_depth
    return f"denoising the pixels as {side}x{side} blocks ({3 * side**2} channels at 1/{side} of the side)"


def _decoder_lines(report: dict) -> list[str]:
    """The "Decoder (text-to-image)" section: its training, its judged figures by guidance scale, the samples."""
    decoder, generation, samples = report["decoder"], report["generation"], report["samples"]
    ema = decoder["ema"] or {}
    return [
        "## Decoder (text-to-image)",
        "",
        f"UNet `{decoder['model']}` ({decoder['parameters'] / 1e6:.2f} M parameters) cross-attending to the frozen CLIP "
        f"text encoder's token states, {_pixel_space(decoder.get('space_to_depth', 1))}: {decoder['steps']} steps of "
        f"batch {decoder['train_batch_size']} "
        f"({decoder['samples_seen']} samples), learning rate {decoder['learning_rate']:g}, "
        f"{decoder['prediction_type']} on a {decoder['beta_schedule']} schedule, min-SNR gamma {decoder['snr_gamma']}, "
        f"caption dropout {decoder['caption_dropout']:g}, precision {_precision(decoder['mixed_precision'])}; "
        f"final loss {_num(decoder['final_loss'], 4)}; saved weights: "
        + (f"EMA ({_ema_decay(ema)})." if ema else "raw (no EMA)."),
        "",
        f"Judged on {generation['settings']['num_images_per_prompt']} images per colour-shape prompt and guidance "
        f"scale ({generation['settings']['scheduler']}, {generation['settings']['num_inference_steps']} steps, "
        f"{generation['settings'].get('dtype', 'fp32')}) by an "
        "attribute judge trained on ground-truth renders, which also says when an image shows no object, several "
        "objects or nothing recognisable: such an image counts as wrong in colour and in shape (chance for a "
        f"one-object image: colour {_pct(generation['judge']['chance_colour_accuracy'])}, shape "
        f"{_pct(generation['judge']['chance_shape_accuracy'])}). Held-out compositions were in no training image "
        "or caption of the CLIP or the decoder.",
        "",
        *_generation_table(generation),
        "",
        f"CLIP score: mean cosine of image and prompt under the trained CLIP. FD: Fréchet distance of CLIP image "
        f"features to the test split's single-object images; ground-truth renders score "
        f"{_num(generation['fd_clip_floor'], 2)} at this sample size. " + _diversity_sentence(generation),
        "",
        f"Samples ({samples['images_per_prompt']} per prompt, guidance {samples['guidance_scale']:g}, "
        f"{samples['scheduler']} {samples['num_inference_steps']} steps, {samples.get('dtype', 'fp32')}; the first "
        "images of the evaluation; "
        "`samples/images.jsonl` records each one's prompt and the seed with which `clipcond generate` redraws it):",
        "",
        "![samples](samples/grid.png)",
        "",
        f"Judged grid: `decoder/eval_generation/grid_guidance_{float(generation['guidance_scale'])}.png`.",
        "",
    ]


def _latent_lines(report: dict) -> list[str]:
    """The "Latent path" section (empty without `--latent`): the VAE and its judged reconstructions, then the latent
    decoder's judged figures."""
    if "latent_generation" not in report:
        return []
    vae, vae_eval, decoder = report["vae"], report["vae_eval"], report["latent_decoder"]
    originals, reconstructions = vae_eval["judged_originals"], vae_eval["judged_reconstructions"]
    generation = report["latent_generation"]
    size = vae["latent_size"]
    return [
        "## Latent path (Stable Diffusion's layout)",
        "",
        f"VAE `{vae['preset']}` ({vae['parameters'] / 1e6:.2f} M parameters, downsampling x{vae['downsampling_factor']}: "
        f"{size}x{size} latents), {vae['reconstruction_loss']} reconstruction + KL (weight {vae['kl_weight']:g}): "
        f"{vae['steps']} steps of batch {vae['train_batch_size']}, learning rate {vae['learning_rate']:g}; latent "
        f"scaling factor {_num(vae['scaling_factor'], 4)}, measured on the training images.",
        "",
        f"Reconstructions of {vae_eval['num_images']} one-object test images: PSNR {_num(vae_eval['psnr'], 2)} dB; the "
        f"judge reads the colour of {_pct(reconstructions['colour_accuracy'])} and the shape of "
        f"{_pct(reconstructions['shape_accuracy'])} of them right (of the originals: "
        f"{_pct(originals['colour_accuracy'])} and {_pct(originals['shape_accuracy'])}).",
        "",
        "![reconstructions](vae/eval/reconstructions.png)",
        "",
        f"UNet `{decoder['model']}` ({decoder['parameters'] / 1e6:.2f} M parameters) on the VAE's latents, "
        f"cross-attending to the CLIP text encoder's unmasked token states: {decoder['steps']} steps of batch "
        f"{decoder['train_batch_size']}, learning rate {decoder['learning_rate']:g}, precision "
        f"{_precision(decoder['mixed_precision'])}; final loss {_num(decoder['final_loss'], 4)}. "
        "`clipcond export stable-diffusion latent_decoder OUT` hands it to stock diffusers. Judged as the pixel "
        "decoder is:",
        "",
        *_generation_table(generation),
        "",
        f"Judged grid: `latent_decoder/eval_generation/grid_guidance_{float(generation['guidance_scale'])}.png`.",
        "",
    ]


def _timing_lines(report: dict) -> list[str]:
    """The "Time by stage" section and the machine it ran on."""
    seconds = report["seconds"]
    return [
        "## Time by stage",
        "",
        "| stage | wall seconds | CPU seconds | load average at the end |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name}{' (reused)' if t.get('reused') else ''} | {t['wall']} | {t['cpu']} | {t['load_average']} |"
            for name, t in report["timings"].items()
        ),
        f"| **total** | {round(sum(seconds.values()), 1)} | "
        f"{round(sum(t['cpu'] for t in report['timings'].values()), 1)} | |",
        "",
        f"Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['torch_threads']} torch threads, "
        f"load average {report['machine']['load_average_start']} at the start (other work on the machine inflates wall "
        "times, not CPU times). A reused stage was found complete; its times are those of the run that made it.",
        "",
    ]


def render_markdown(report: dict) -> str:
    """report.md: the data, the CLIP, the decoder, with `--dalle2` the DALL-E 2 path, and the time by stage."""
    sections = (_intro_lines, _clip_lines, _probe_lines, _decoder_lines, _dalle2_lines, _latent_lines, _timing_lines)
    return "\n".join(line for section in sections for line in section(report))


def write_report(out: Path, report: dict) -> None:
    """Write report.md and report.json (non-finite figures as null) into the demo folder `out`."""
    (out / "report.md").write_text(render_markdown(report))
    write_json_atomic(out / "report.json", finite_or_null(report))


def summary_line(report: dict, out: Path) -> str:
    """The JSON line the demo prints: where the report is, the headline figures (rounded), the stage times."""
    clip_eval = report["clip_eval"]
    return dumps_json(
        finite_or_null(
            {
                "report": str(out / "report.md"),
                **{k: clip_eval[k] for k in ("zero_shot_top1_seen", "zero_shot_top1_heldout")},
                **_judged_headline(report["generation"]),
                **({"dalle2": _dalle2_headline(report)} if "unclip_eval" in report else {}),
                **({"latent": _latent_headline(report)} if "latent_generation" in report else {}),
                "seconds": report["seconds"],
            }
        )
    )
