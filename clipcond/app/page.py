"""The Gradio page of `clipcond serve`: a tab per thing the served runs can do (`ServedRuns.tabs`), each calling its
handler (`clipcond.app.handlers`) through a queue that runs one request at a time, and a Runs tab.

A handler's `RequestError` (or a `ValueError` / `FileNotFoundError` of the library below it) becomes a message on
the page; anything else is logged with its traceback on the server and shown as one line, never as a stack trace.
"""

from __future__ import annotations

import functools
import logging

from clipcond.app import handlers
from clipcond.app.runs import ServedRuns
from clipcond.pipeline_loading import SCHEDULER_NAMES
from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE, DEFAULT_TEXT_GUIDANCE_SCALE

logger = logging.getLogger(__name__)

# Generated images are small (32-64 px): show their pixels, not a blur.
CSS = ".pixels img { image-rendering: pixelated; }"
IMAGE_FILES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"]
DEFAULT_GUIDANCE = {
    handlers.STABLE_DIFFUSION: DEFAULT_TEXT_GUIDANCE_SCALE,
    handlers.DALLE2: DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
}


def answered(fn):
    """`fn` with its errors turned into messages on the page."""
    import gradio as gr

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
    """A handler's `progress(done, total)` shown by Gradio's progress bar, beside the sampler's steps that it tracks
    (Gradio hands a `gr.Progress` to the event functions that name one as a default argument: their `noqa: B008`)."""
    return lambda done, total: progress(done / total, desc=f"{done}/{total} images")


def gallery(drawn: handlers.Drawn) -> list:
    return list(zip(drawn.images, drawn.labels))


def build_page(runs: ServedRuns):
    """The page (a `gradio.Blocks`, queued one request at a time) for `runs`."""
    import gradio as gr

    with gr.Blocks(title="clipcond") as page:
        gr.Markdown(f"# clipcond\n{handlers.serving_line(runs)}")
        tabs = runs.tabs
        if "Generate" in tabs:
            _generate_tab(runs)
        if "Vary" in tabs:
            _vary_tab(runs)
        if "Search" in tabs:
            _search_tab(runs)
        if "Caption" in tabs:
            _caption_tab(runs)
        if "Compare" in tabs:
            _compare_tab(runs)
        with gr.Tab("Runs"):
            gr.Markdown(handlers.run_panel(runs), elem_id="run-panel")
    page.queue(default_concurrency_limit=1)
    return page


def _path_choice(runs: ServedRuns, elem_id: str):
    """The text-to-image path (a radio when both are served) and the guidance field, which follows its default."""
    import gradio as gr

    paths = handlers.text_paths(runs)
    path = gr.Radio(paths, value=paths[0], label="path", visible=len(paths) > 1, elem_id=f"{elem_id}-path")
    return path, paths


def _generate_tab(runs: ServedRuns) -> None:
    import gradio as gr

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
            images = gr.Gallery(label="images", columns=4, elem_id="generate-gallery", elem_classes="pixels")
            files = gr.File(label="PNGs and images.jsonl", file_count="multiple", elem_id="generate-files")
            records = gr.JSON(label="images.jsonl", elem_id="generate-records")
    path.change(lambda p: DEFAULT_GUIDANCE[p], path, scale)

    @answered
    def on_generate(
        path, prompt, negative, seed, count, scale, scheduler, steps, progress=gr.Progress(track_tqdm=True)
    ):  # noqa: B008
        drawn = handlers.generate(
            runs, path, prompt, negative, seed, count, scale, scheduler, steps, tracker(progress)
        )
        return gallery(drawn), [str(f) for f in drawn.files], drawn.records

    inputs = [path, prompt, negative, seed, count, scale, scheduler, steps]
    button.click(on_generate, inputs, [images, files, records])
    prompt.submit(on_generate, inputs, [images, files, records])


def _scheduler_choice():
    """The sampler: DEFAULT_SAMPLER until changed; "saved" keeps the run's own."""
    import gradio as gr

    choices = [handlers.SAVED_SCHEDULER, *SCHEDULER_NAMES]
    return gr.Dropdown(choices, value=handlers.DEFAULT_SCHEDULER, label="scheduler")


def _image_input(runs: ServedRuns, label: str, elem_id: str):
    """An upload field, and a pick of the test images when the runs have some; the handler gets a file path."""
    import gradio as gr

    upload = gr.File(label=label, file_types=IMAGE_FILES, type="filepath", elem_id=elem_id)
    choices = [(name, str(path)) for name, path in runs.test_images]
    pick = gr.Dropdown(choices, value=None, label="... or a test image", visible=bool(choices))
    return upload, pick


def _vary_tab(runs: ServedRuns) -> None:
    import gradio as gr

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
                images = gr.Gallery(label="source, then variations", columns=5, elem_classes="pixels")
                files = gr.File(label="PNGs and images.jsonl", file_count="multiple")
        gr.Markdown("### Interpolate: a row between two prompts (through the prior) or two images")
        with gr.Row():
            with gr.Column(scale=1):
                prompt_a = gr.Textbox(label="first prompt", visible=runs.unclip is not None)
                prompt_b = gr.Textbox(label="second prompt", visible=runs.unclip is not None)
                image_a = gr.File(label="first image", file_types=IMAGE_FILES, type="filepath")
                image_b = gr.File(label="second image", file_types=IMAGE_FILES, type="filepath")
                frames = gr.Number(8, precision=0, label="frames")
                row_button = gr.Button("Interpolate", elem_id="interpolate-button")
            with gr.Column(scale=2):
                row = gr.Gallery(label="row", columns=8, elem_classes="pixels")

    @answered
    def on_vary(upload, pick, seed, count, scale, steps, scheduler, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        drawn = handlers.vary(runs, upload or pick, seed, count, scale, steps, scheduler, tracker(progress))
        return gallery(drawn), [str(f) for f in drawn.files]

    @answered
    def on_interpolate(prompt_a, prompt_b, image_a, image_b, frames, seed, scale, steps, scheduler):
        row = handlers.interpolate(runs, prompt_a, prompt_b, image_a, image_b, frames, seed, scale, steps, scheduler)
        return gallery(row)

    button.click(on_vary, [upload, pick, seed, count, scale, steps, scheduler], [images, files])
    inputs = [prompt_a, prompt_b, image_a, image_b, frames, seed, scale, steps, scheduler]
    row_button.click(on_interpolate, inputs, row)


def _search_tab(runs: ServedRuns) -> None:
    import gradio as gr

    with gr.Tab("Search"), gr.Row():
        with gr.Column(scale=1):
            text = gr.Textbox(label="text query", placeholder="a red circle", elem_id="search-text")
            upload = gr.File(label="... or an image query", file_types=IMAGE_FILES, type="filepath")
            top_k = gr.Number(8, precision=0, label="top-k")
            button = gr.Button("Search", variant="primary", elem_id="search-button")
        with gr.Column(scale=2):
            results = gr.Gallery(label="rank, cosine, file", columns=4, elem_classes="pixels")

    @answered
    def on_search(text, upload, top_k):
        return [(found.path, found.label) for found in handlers.search(runs, text, upload, top_k)]

    button.click(on_search, [text, upload, top_k], results)
    text.submit(on_search, [text, upload, top_k], results)


def _caption_tab(runs: ServedRuns) -> None:
    import gradio as gr

    with gr.Tab("Caption"), gr.Row():
        with gr.Column(scale=1):
            upload, pick = _image_input(runs, "image", "caption-upload")
            question = gr.Textbox(label="question (empty: a caption)", placeholder="how many objects are there?")
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
        return handlers.caption(runs, upload or pick, question, sample, temperature, seed, tokens)

    button.click(on_caption, [upload, pick, question, sample, temperature, seed, tokens], text)


def _compare_tab(runs: ServedRuns) -> None:
    import gradio as gr

    with gr.Tab("Compare"), gr.Row():
        with gr.Column(scale=1):
            path, _ = _path_choice(runs, "compare")
            prompt = gr.Textbox(label="prompt", placeholder="a red circle")
            seed = gr.Number(0, precision=0, label="seed")
            scales = gr.Textbox("1, 3, 5", label="guidance scales (columns)")
            schedulers = gr.CheckboxGroup(
                [handlers.SAVED_SCHEDULER, *SCHEDULER_NAMES],
                value=[handlers.SAVED_SCHEDULER],
                label="schedulers (rows)",
            )
            steps = gr.Number(25, precision=0, label="steps")
            button = gr.Button("Compare", variant="primary", elem_id="compare-button")
        with gr.Column(scale=2):
            grid = gr.Image(label="the same seed across settings", type="pil", elem_classes="pixels")
            records = gr.JSON(label="images.jsonl")

    @answered
    def on_compare(path, prompt, seed, scales, schedulers, steps, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return handlers.compare(runs, path, prompt, seed, scales, schedulers, steps, tracker(progress))

    button.click(on_compare, [path, prompt, seed, scales, schedulers, steps], [grid, records])
