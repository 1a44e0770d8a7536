"""The Gradio page of `clipcond serve`: a tab per thing the served runs can do (`ServedRuns.tabs`), each calling its
handler (`clipcond.app.handlers`), and a Runs tab.

Every event that uses a model shares one queue (`concurrency_id`, one at a time), so the page shows a request its
place in line; the handlers hold `runs.lock` besides. A handler's `RequestError` (or a `ValueError` /
`FileNotFoundError` of the library below it) becomes a message on the page; anything else is logged with its
traceback on the server and shown as one line, never as a stack trace.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr

from clipcond.app import handlers, panel
from clipcond.app.checks import IMAGE_SUFFIXES
from clipcond.app.runs import ServedRuns
from clipcond.models.captioner import CAPTION_BEST_OF
from clipcond.pipeline_loading import DEFAULT_SAMPLER, SAVED_SCHEDULER, SCHEDULER_NAMES
from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE, DEFAULT_TEXT_GUIDANCE_SCALE

logger = logging.getLogger(__name__)

# Generated images are small (32-64 px): show their pixels, not a blur.
CSS = ".pixels img { image-rendering: pixelated; }"
DEFAULT_GUIDANCE = {
    handlers.STABLE_DIFFUSION: DEFAULT_TEXT_GUIDANCE_SCALE,
    handlers.DALLE2: DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
}
MODELS = {"concurrency_id": "models", "concurrency_limit": 1}  # one queue for every event that uses a model
# The default argument by which Gradio hands an event function its progress bar, following the sampler's steps too.
PROGRESS = gr.Progress(track_tqdm=True)


def answered(fn):
    """`fn` with its errors turned into messages on the page."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as err:  # RequestError included: the user's input
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:
            logger.exception("request failed")
            raise gr.Error(
                f"the request failed ({type(err).__name__}: {err}); the server's log has the details"
            ) from None

    return wrapper


def tracker(progress):
    """A handler's `progress(done, total)` shown by Gradio's progress bar, beside the sampler's steps it tracks."""
    return lambda done, total: progress(done / total, desc=f"{done}/{total} images")


def shown(drawn: handlers.Drawn) -> tuple[list, list[str]]:
    """A drawing as the page shows it: the gallery (the source first, for variations) and the files to download."""
    gallery = list(zip(drawn.images, drawn.labels))
    if drawn.source is not None:
        gallery.insert(0, (drawn.source, "source"))
    return gallery, [str(f) for f in drawn.files]


def build_page(runs: ServedRuns):
    """The page (a `gradio.Blocks`, queued) for `runs`."""
    # Gradio keeps a copy of every upload and output in its cache: files a day old go, checked every hour.
    with gr.Blocks(title="clipcond", delete_cache=(3600, 86400)) as page:
        gr.Markdown(f"# clipcond\n{panel.serving_line(runs)}")
        tabs = runs.tabs
        for name, build in (
            ("Generate", _generate_tab),
            ("Vary", _vary_tab),
            ("Search", _search_tab),
            ("Caption", _caption_tab),
            ("Compare", _compare_tab),
        ):
            if name in tabs:
                build(runs)
        with gr.Tab("Runs"):
            gr.Markdown(panel.run_panel(runs), elem_id="run-panel")
    page.queue()
    return page


# --------------------------------------------------------------------------------------------------- fields


def _path_choice(runs: ServedRuns, elem_id: str):
    """The text-to-image path: a radio when both are served (hidden otherwise), and the paths."""
    paths = handlers.text_paths(runs)
    return gr.Radio(paths, value=paths[0], label="path", visible=len(paths) > 1, elem_id=f"{elem_id}-path"), paths


def _scheduler_choice():
    """The sampler: DEFAULT_SAMPLER until changed; "saved" keeps the run's own."""
    return gr.Dropdown([SAVED_SCHEDULER, *SCHEDULER_NAMES], value=DEFAULT_SAMPLER, label="scheduler")


def _image_input(runs: ServedRuns, label: str, elem_id: str):
    """An upload field, and a pick of the test images when the runs have some; the handler gets a file path."""
    upload = gr.File(label=label, file_types=list(IMAGE_SUFFIXES), type="filepath", elem_id=elem_id)
    choices = [(name, str(path)) for name, path in runs.test_images]
    pick = gr.Dropdown(choices, value=None, label=f"... or a test image as the {label}", visible=bool(choices))
    return upload, pick


def _outputs(gallery_label: str, elem_id: str, columns: int = 4):
    images = gr.Gallery(label=gallery_label, columns=columns, elem_id=f"{elem_id}-gallery", elem_classes="pixels")
    files = gr.File(label="PNGs, images.jsonl, grid.png", file_count="multiple", elem_id=f"{elem_id}-files")
    return images, files


# ----------------------------------------------------------------------------------------------------- tabs


def _generate_tab(runs: ServedRuns) -> None:
    with gr.Tab("Generate"), gr.Row():
        with gr.Column(scale=1):
            path, paths = _path_choice(runs, "generate")
            prompt = gr.Textbox(label="prompt", placeholder="a red circle", elem_id="generate-prompt")
            negative = gr.Textbox(label="negative prompt (optional)")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed", elem_id="generate-seed")
                count = gr.Number(4, precision=0, label="images", elem_id="generate-count")
            with gr.Row():
                scale = gr.Number(DEFAULT_GUIDANCE[paths[0]], label="guidance scale", elem_id="generate-guidance")
                steps = gr.Number(25, precision=0, label="steps", elem_id="generate-steps")
            scheduler = _scheduler_choice()
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=2):
            images, files = _outputs("images", "generate")
            records = gr.JSON(label="images.jsonl", elem_id="generate-records")
    path.change(lambda p: DEFAULT_GUIDANCE[p], path, scale)

    @answered
    def on_generate(path, prompt, negative, seed, count, scale, scheduler, steps, progress=PROGRESS):
        drawn = handlers.generate(
            runs, path=path, prompt=prompt, negative_prompt=negative, seed=seed, num_images=count,
            guidance_scale=scale, scheduler=scheduler, steps=steps, progress=tracker(progress),
        )  # fmt: skip
        return *shown(drawn), drawn.records

    inputs = [path, prompt, negative, seed, count, scale, scheduler, steps]
    for event in (button.click, prompt.submit):
        event(on_generate, inputs, [images, files, records], **MODELS)


def _vary_tab(runs: ServedRuns) -> None:
    with gr.Tab("Vary"):
        with gr.Row():
            with gr.Column(scale=1):
                upload, pick = _image_input(runs, "image", "vary-upload")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed")
                    count = gr.Number(4, precision=0, label="variations")
                with gr.Row():
                    scale = gr.Number(DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE, label="guidance scale")
                    steps = gr.Number(25, precision=0, label="steps")
                scheduler = _scheduler_choice()
                button = gr.Button("Vary", variant="primary", elem_id="vary-button")
            with gr.Column(scale=2):
                images, files = _outputs("source, then variations", "vary", columns=5)
        gr.Markdown(
            "### Interpolate\nA row between two prompts (through the prior) or, when an image is given, two images; "
            "with the seed, guidance scale, steps and scheduler above."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt_a = gr.Textbox(label="first prompt", visible=runs.unclip is not None)
                prompt_b = gr.Textbox(label="second prompt", visible=runs.unclip is not None)
                image_a, pick_a = _image_input(runs, "first image", "interpolate-first")
                image_b, pick_b = _image_input(runs, "second image", "interpolate-second")
                frames = gr.Number(8, precision=0, label="frames")
                row_button = gr.Button("Interpolate", elem_id="interpolate-button")
            with gr.Column(scale=2):
                row, row_files = _outputs("row", "interpolate", columns=8)

    @answered
    def on_vary(upload, pick, seed, count, scale, steps, scheduler, progress=PROGRESS):
        drawn = handlers.vary(
            runs, image=upload or pick, seed=seed, num_images=count, guidance_scale=scale, steps=steps,
            scheduler=scheduler, progress=tracker(progress),
        )  # fmt: skip
        return shown(drawn)

    @answered
    def on_interpolate(
        a, b, image_a, pick_a, image_b, pick_b, frames, seed, scale, steps, scheduler, progress=PROGRESS
    ):
        drawn = handlers.interpolate(
            runs, prompts=(a, b), images=(image_a or pick_a, image_b or pick_b), frames=frames, seed=seed,
            guidance_scale=scale, steps=steps, scheduler=scheduler, progress=tracker(progress),
        )  # fmt: skip
        return shown(drawn)

    button.click(on_vary, [upload, pick, seed, count, scale, steps, scheduler], [images, files], **MODELS)
    inputs = [prompt_a, prompt_b, image_a, pick_a, image_b, pick_b, frames, seed, scale, steps, scheduler]
    row_button.click(on_interpolate, inputs, [row, row_files], **MODELS)


def _search_tab(runs: ServedRuns) -> None:
    with gr.Tab("Search"), gr.Row():
        with gr.Column(scale=1):
            text = gr.Textbox(label="text query", placeholder="a red circle", elem_id="search-text")
            upload = gr.File(label="... or an image query", file_types=list(IMAGE_SUFFIXES), type="filepath")
            top_k = gr.Number(8, precision=0, label="top-k")
            button = gr.Button("Search", variant="primary", elem_id="search-button")
        with gr.Column(scale=2):
            results = gr.Gallery(
                label="rank, cosine, file", columns=4, elem_id="search-gallery", elem_classes="pixels"
            )

    @answered
    def on_search(text, upload, top_k):
        return [(found.path, found.label) for found in handlers.search(runs, text=text, image=upload, top_k=top_k)]

    for event in (button.click, text.submit):
        event(on_search, [text, upload, top_k], results, **MODELS)


def _caption_tab(runs: ServedRuns) -> None:
    with gr.Tab("Caption"), gr.Row():
        with gr.Column(scale=1):
            upload, pick = _image_input(runs, "image", "caption-upload")
            question = gr.Textbox(label="question (empty: a caption)", placeholder="how many objects are there?")
            gr.Markdown(
                f"A caption is the likeliest per token of {CAPTION_BEST_OF} candidates (the greedy one and samples at "
                "the temperature, from the seed), as `clipcond caption` writes it; *sample* shows one sample instead. "
                "An answer is greedy."
            )
            with gr.Row():
                sample = gr.Checkbox(False, label="sample")
                temperature = gr.Number(1.0, label="temperature")
                seed = gr.Number(0, precision=0, label="seed")
            tokens = gr.Number(handlers.CAPTION_TOKENS, precision=0, label="max new tokens")
            button = gr.Button("Caption", variant="primary", elem_id="caption-button")
        with gr.Column(scale=1):
            text = gr.Textbox(label="the captioner says", elem_id="caption-text")

    @answered
    def on_caption(upload, pick, question, sample, temperature, seed, tokens):
        return handlers.caption(
            runs, image=upload or pick, question=question, do_sample=sample, temperature=temperature, seed=seed,
            max_new_tokens=tokens,
        )  # fmt: skip

    inputs = [upload, pick, question, sample, temperature, seed, tokens]
    button.click(on_caption, inputs, text, **MODELS)


def _compare_tab(runs: ServedRuns) -> None:
    with gr.Tab("Compare"), gr.Row():
        with gr.Column(scale=1):
            path, _ = _path_choice(runs, "compare")
            prompt = gr.Textbox(label="prompt", placeholder="a red circle")
            seed = gr.Number(0, precision=0, label="seed")
            scales = gr.Textbox("1, 3, 5", label="guidance scales (columns)")
            schedulers = gr.CheckboxGroup(
                [SAVED_SCHEDULER, *SCHEDULER_NAMES], value=[DEFAULT_SAMPLER], label="schedulers (rows)"
            )
            steps = gr.Number(25, precision=0, label="steps")
            button = gr.Button("Compare", variant="primary", elem_id="compare-button")
        with gr.Column(scale=2):
            grid = gr.Image(label="the same seed across settings", type="filepath", elem_classes="pixels")
            files = gr.File(label="PNGs, images.jsonl, grid.png", file_count="multiple")

    @answered
    def on_compare(path, prompt, seed, scales, schedulers, steps, progress=PROGRESS):
        drawn = handlers.compare(
            runs, path=path, prompt=prompt, seed=seed, guidance_scales=scales, schedulers=schedulers, steps=steps,
            progress=tracker(progress),
        )  # fmt: skip
        return str(drawn.grid), shown(drawn)[1]

    button.click(on_compare, [path, prompt, seed, scales, schedulers, steps], [grid, files], **MODELS)
