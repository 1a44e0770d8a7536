"""Writes notebooks/04_swap_encoders.ipynb from the cell sources below, without outputs:
`python notebooks/_build_04.py`. Run it with `OMP_NUM_THREADS=1 pytest --nbmake notebooks/04_swap_encoders.ipynb`.

Its set-up follows notebooks 01-03 (`_build.py`): the step budget `CLIPCOND_NOTEBOOK_STEPS`, the working folder
`CLIPCOND_NOTEBOOK_WORKDIR` (shared data and CLIP), `run_once`.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import nbformat
from _build import FIGURE  # the tag of the cell whose picture the README shows

HERE = Path(__file__).resolve().parent

CELLS = [
    (
        "markdown",
        """
        # 4. Swap encoders

        The decoder of the Stable Diffusion path reads a frozen text encoder's per-token states through one small
        interface (`clipcond.encoders`), so the encoder is a choice, not a code path. Here the same decoder recipe
        trains on three encoders:

        | spec | what it is |
        | --- | --- |
        | `clipcond:RUN` | our CLIP, pretrained with `clipcond train clip` |
        | `transformers:PATH` | any transformers CLIP folder: a full `CLIPModel`, or Stable-Diffusion-style `text_encoder/` + `tokenizer/` |
        | `open_clip:MODEL@WEIGHTS` | an open_clip model built by name (or JSON config) with weights from a local file |

        (`t5:PATH`, a T5 encoder, works too: the Stable Diffusion path needs per-token states only.)

        Nothing can be downloaded here, so the transformers and open_clip encoders are **tiny, randomly initialised
        models saved locally** (`clipcond.encoders.tiny`). With pretrained weights on disk, set
        `CLIPCOND_TRANSFORMERS_CLIP=/path/to/clip-vit-base-patch32` and/or
        `CLIPCOND_OPEN_CLIP=ViT-B-32@/path/to/open_clip_pytorch_model.bin` and the same cells use them.

        **Budget.** Every model trains for `CLIPCOND_NOTEBOOK_STEPS=10` steps by default, a smoke test of a minute or
        two on 2 CPU cores whose pictures are noise; `CLIPCOND_NOTEBOOK_STEPS=300` trains for real.

        **A demo folder.** When `CLIPCOND_NOTEBOOK_WORKDIR` names the finished output folder of `clipcond demo`, or a
        `demo/` folder of one lies beside the notebook, its data set and CLIP are used (`clipcond:` is the demo's
        CLIP), and the decoder on our CLIP is the demo's, trained with its recipe; the decoders on the two other
        encoders are still trained here, at the step budget, so they do not compare at equal training: the labels
        say which is which. The demo folder is only read; what the notebook writes goes to a temporary folder.
        `CLIPCOND_NOTEBOOK_WORKDIR=~/clipcond-demo jupyter lab notebooks/04_swap_encoders.ipynb`
        """,
    ),
    (
        "code",
        """
        import json
        import os
        import tempfile
        from pathlib import Path

        import torch
        from IPython.display import Markdown, display

        from clipcond.demo_layout import find_notebook_demo
        from clipcond.plots import image_grid

        STEPS = int(os.environ.get("CLIPCOND_NOTEBOOK_STEPS", "10"))
        SMALL = STEPS < 100  # smaller data, models and batches for a smoke test
        NUM_IMAGES = 2000 if SMALL else 20000

        # A finished `clipcond demo` folder (CLIPCOND_NOTEBOOK_WORKDIR, or ./demo beside the notebook): its data, CLIP
        # and decoder are used instead of training them. It is only read, never written.
        DEMO = find_notebook_demo(os.environ.get("CLIPCOND_NOTEBOOK_WORKDIR"), Path.cwd())
        DEMO_RUNS = DEMO.finished_runs() if DEMO is not None else {}  # run folders by name: clip, decoder, ...

        # Everything is written under WORK: a temporary folder, removed by the last cell, unless
        # CLIPCOND_NOTEBOOK_WORKDIR names a folder to keep, not a demo's (runs found complete there are reused).
        if os.environ.get("CLIPCOND_NOTEBOOK_WORKDIR") and DEMO is None:
            _tmp = None
            WORK = Path(os.environ["CLIPCOND_NOTEBOOK_WORKDIR"]).expanduser()
            WORK.mkdir(parents=True, exist_ok=True)
        else:
            _tmp = tempfile.TemporaryDirectory(prefix="clipcond-notebook-")
            WORK = Path(_tmp.name)
        # Sampling follows the models shown: few steps and images for smoke-test models, more with a demo's decoder.
        QUICK = SMALL and DEMO is None
        if DEMO is not None:
            print(f"Demo folder {DEMO.root}: its data, CLIP and decoder; the other decoders train {STEPS} steps here")
        else:
            print(f"Training {STEPS} steps per model in {WORK}; no demo folder")
        """,
    ),
    (
        "code",
        '''
        from accelerate.state import AcceleratorState, GradientState

        from clipcond.runs import RunRecord


        def run_once(main, argv, output_dir):
            """Run a clipcond training entry point unless `output_dir` holds its finished run; return the run record."""
            record = RunRecord.read_if_present(output_dir)  # clipcond_run.json, read through its type
            if record is not None:
                print(f"reusing {output_dir}")
                return record
            main([*map(str, argv), "--output-dir", str(output_dir), "--resume-from-checkpoint", "latest"])
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            return RunRecord.read(output_dir)
        ''',
    ),
    (
        "markdown",
        """
        ## Data and our CLIP

        The built-in shapes data set, and a CLIP pretrained on it (both shared with notebooks 1-3 through
        `CLIPCOND_NOTEBOOK_WORKDIR`).
        """,
    ),
    (
        "code",
        """
        from clipcond.data import shapes
        from clipcond.data.folders import ImageCaptionDataset
        from clipcond.train import clip as train_clip

        DATA = DEMO.data if DEMO is not None else WORK / f"shapes-{NUM_IMAGES}"
        if shapes.load_dataset_info(DATA) is None:
            shapes.main([str(DATA), "--num-images", str(NUM_IMAGES), "--overwrite"])  # `clipcond data shapes`
        CAPTIONS = ImageCaptionDataset(DATA, split="train").captions

        CLIP = DEMO_RUNS.get("clip", WORK / f"clip-{STEPS}")  # a finished run is reused, not trained again
        clip_argv = ["--data", DATA, "--max-train-steps", STEPS, "--validation-steps", 0, "--report-to", "tensorboard"]
        if SMALL:
            clip_argv += ["--train-batch-size", 64, "--lr-warmup-steps", max(1, STEPS // 10)]
        clip_record = run_once(train_clip.main, clip_argv, CLIP)  # `clipcond train clip`
        """,
    ),
    (
        "markdown",
        """
        ## Three encoders behind one interface

        `load_encoder(spec)` gives a `FrozenEncoder` (weights frozen, eval mode): `encode_text` returns per-token
        states with their attention mask and, for CLIPs, the pooled embedding; `encode_image` the image embedding
        and patch tokens. Each states its widths, context length, image size and end/pad tokens, and its lineage
        (kind, name, content hash), which every trained decoder and prior records.
        """,
    ),
    (
        "code",
        """
        from clipcond.encoders import check_compatibility, load_encoder
        from clipcond.encoders.tiny import save_tiny_open_clip, save_tiny_transformers_clip

        # Pretrained folders if you have them; else tiny random stand-ins saved here (their tokenizers learn the captions).
        transformers_spec = os.environ.get("CLIPCOND_TRANSFORMERS_CLIP")
        transformers_spec = f"transformers:{transformers_spec}" if transformers_spec else None
        transformers_spec = transformers_spec or save_tiny_transformers_clip(WORK / "tiny-transformers-clip", texts=CAPTIONS)
        open_clip_spec = os.environ.get("CLIPCOND_OPEN_CLIP")
        open_clip_spec = f"open_clip:{open_clip_spec}" if open_clip_spec else None
        open_clip_spec = open_clip_spec or save_tiny_open_clip(WORK / "tiny-open-clip")

        SPECS = {"ours": f"clipcond:{CLIP}", "transformers": transformers_spec, "open_clip": open_clip_spec}
        ENCODERS = {name: load_encoder(spec) for name, spec in SPECS.items()}

        rows = ["| encoder | kind | token width | embedding | context | end / pad token | content hash |", "|---" * 7 + "|"]
        for name, enc in ENCODERS.items():
            text = enc.encode_text(["a red circle"])
            assert text.hidden_states.shape == (1, enc.context_length, enc.text_width)
            rows.append(
                f"| {name} | {enc.kind} | {enc.text_width} | {enc.embed_dim} | {enc.context_length} | "
                f"{enc.eos_token_id} / {enc.pad_token_id} | `{enc.content_hash[:12]}` |"
            )
        display(Markdown("\\n".join(rows)))

        # Before training, the compatibility check: a UNet of another width than the encoder's gets a learned projection.
        print(check_compatibility(ENCODERS["transformers"], cross_attention_dim=64, new_model=True).projections)
        """,
    ),
    (
        "markdown",
        """
        ## The same decoder recipe on each

        `clipcond train decoder --text-encoder SPEC` (`--clip RUN` is a synonym of `--text-encoder clipcond:RUN`).
        Each run folder is a complete `TextToImagePipeline` holding its encoder (open_clip's towers are saved as
        diffusers modules, so loading needs no open_clip factory), and its `clipcond_run.json` records the encoder.
        The caption-embedding cache is keyed by the encoder, so the three runs never share stale states.
        """,
    ),
    (
        "code",
        """
        from clipcond.train import decoder as train_decoder

        RUNS = {}
        for name, spec in SPECS.items():
            argv = ["--text-encoder", spec, "--data", DATA, "--max-train-steps", STEPS, "--validation-steps", 0]
            if SMALL:  # the test UNet at 16 px
                argv += ["--model", "test", "--resolution", 16, "--train-batch-size", 16, "--lr-warmup-steps", 1]
            else:  # as the demo's decoder: the pixels as 2 x 2 blocks
                argv += ["--space-to-depth", 2]
            RUNS[name] = WORK / f"decoder-{name}-{STEPS}"
            if name == "ours":  # a demo's decoder was trained on the demo's CLIP: our encoder
                RUNS[name] = DEMO_RUNS.get("decoder", RUNS[name])
            record = run_once(train_decoder.main, argv, RUNS[name])
            print(f"{name}: {RUNS[name]}, {record.summary['steps']} steps, final loss {record.summary['final_loss']}")
        # Labels that say how long each decoder trained (a demo's decoder trained far longer than the others here).
        TRAINED = {name: f"{name} ({RunRecord.read(run).summary['steps']} steps)" for name, run in RUNS.items()}
        """,
    ),
    (
        "markdown",
        """
        ## Side by side

        The same prompts and the same noise (one generator per image) through each decoder: a row per prompt,
        columns grouped by encoder, labelled with the decoder's training steps.
        """,
    ),
    (
        "code",
        """
        from clipcond.pipelines.text_to_image import TextToImagePipeline

        PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
        PER_PROMPT = 2
        INFERENCE_STEPS = 5 if QUICK else 25
        PIPES = {name: TextToImagePipeline.from_pretrained(run, local_files_only=True) for name, run in RUNS.items()}


        def generate(pipe, prompts, per_prompt, seed=0):
            generators = [torch.Generator().manual_seed(seed + k) for k in range(len(prompts) * per_prompt)]
            pipe.set_progress_bar_config(disable=True)
            return pipe(
                prompts, num_images_per_prompt=per_prompt, num_inference_steps=INFERENCE_STEPS,
                generator=generators, output_type="pil",
            ).images


        by_encoder = {name: generate(pipe, PROMPTS, PER_PROMPT) for name, pipe in PIPES.items()}
        images, labels = [], []
        for p, prompt in enumerate(PROMPTS):
            for name in PIPES:
                images += by_encoder[name][p * PER_PROMPT : (p + 1) * PER_PROMPT]
                labels += [f"{TRAINED[name]}: {prompt}"] * PER_PROMPT
        display(image_grid(images, rows=len(PROMPTS), cols=len(PIPES) * PER_PROMPT, labels=labels))
        """,
        FIGURE,
    ),
    (
        "markdown",
        """
        ## Judged accuracy

        An attribute judge (a small CNN trained on ground-truth renders, `clipcond.evaluation.judge`) names the
        colour and shape of each generated image; the table gives the shares it judges right, per encoder. At the
        default budget these are near chance (1 in 6 colours, 1 in 3 shapes here), or 0 where the images are noise
        (the judge counts an unrecognisable image as wrong); raise `CLIPCOND_NOTEBOOK_STEPS`. With a demo folder the
        decoder on our CLIP is the demo's, trained with its recipe: its row shows what a trained decoder scores.
        """,
    ),
    (
        "code",
        """
        import numpy as np

        from clipcond.evaluation.judge import JudgeTrainingConfig, load_or_train_judge

        # A quicker judge for the smoke test; the default one (cached under ~/.cache/clipcond) otherwise. One judge
        # per image size: a demo's decoder draws at the data's 32 px, the smoke-test decoders at 16.
        judge_config = JudgeTrainingConfig(num_renders=384, epochs=2, num_eval_renders=90) if QUICK else None
        judges = {}
        PAIRS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
        PER_PAIR = 2 if QUICK else 8

        rows = ["| encoder | colour | shape | both |", "|---|---|---|---|"]
        for name, pipe in PIPES.items():
            pil = generate(pipe, [f"a {c} {s}" for c, s in PAIRS], PER_PAIR, seed=1000)
            pixels = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in pil])  # uint8 (B, 3, H, W)
            resolution = pixels.shape[-1]  # the images' size (a UNet on pixel blocks has a smaller sample size)
            if resolution not in judges:
                judges[resolution] = load_or_train_judge(resolution, config=judge_config)
            judge = judges[resolution]
            colours = [c for c, _ in PAIRS for _ in range(PER_PAIR)]
            shapes_ = [s for _, s in PAIRS for _ in range(PER_PAIR)]
            acc = judge.score(pixels, colours, shapes_).accuracy()
            rows.append(f"| {TRAINED[name]} | {acc['colour_accuracy']:.2f} | {acc['shape_accuracy']:.2f} | {acc['both_accuracy']:.2f} |")
        display(Markdown("\\n".join(rows)))
        """,
    ),
    (
        "markdown",
        """
        ## Lineage: a decoder stays with its encoder

        `load_text_to_image(run, encoder)` checks the run's recorded encoder against the one given, by content hash,
        and refuses another one unless asked (`allow_encoder_mismatch=True`, `clipcond generate --text-encoder SPEC
        --allow-encoder-mismatch`); even then the widths must fit, and the error names both numbers.
        """,
    ),
    (
        "code",
        """
        from clipcond.encoders import load_text_to_image

        ours, theirs = ENCODERS["ours"].text_width, ENCODERS["transformers"].text_width
        try:
            load_text_to_image(RUNS["ours"], ENCODERS["transformers"])
            raise AssertionError("another encoder was loaded without allow_encoder_mismatch")
        except ValueError as err:
            print("refused:", err)
        try:
            load_text_to_image(RUNS["ours"], ENCODERS["transformers"], allow_encoder_mismatch=True)
            assert ours == theirs, f"a {theirs}-wide encoder was loaded into a decoder trained on a {ours}-wide one"
            print("loaded with another encoder of the same width (allowed explicitly)")
        except ValueError as err:
            assert ours != theirs and str(theirs) in str(err), err  # only a width that does not fit is refused now
            print("allowed, but does not fit:", err)
        """,
    ),
    ("code", "if _tmp is not None:\n    _tmp.cleanup()"),
]


def build() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook.metadata["language_info"] = {"name": "python"}
    for i, (kind, source, *tags) in enumerate(CELLS):
        source = dedent(source).strip("\n")
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        cell.id = f"nb04-{i:02d}"  # stable ids: a rebuild diffs only where a cell changed
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


if __name__ == "__main__":
    nbformat.write(build(), HERE / "04_swap_encoders.ipynb")
    print(HERE / "04_swap_encoders.ipynb")
