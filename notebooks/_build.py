"""Writes notebooks 01-03 from the cell sources below, without outputs: `python notebooks/_build.py`.

The notebooks are generated so that their code reads (and diffs) as Python here, and so that the committed files
are always stripped (tests/test_notebooks_clean.py checks). Edit a notebook here, rebuild, then run it with
`OMP_NUM_THREADS=1 pytest --nbmake notebooks/0*.ipynb`. 04_swap_encoders.ipynb has its own builder, _build_04.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import nbformat

HERE = Path(__file__).resolve().parent

# The tag of the cell whose picture the README shows (notebooks/_render_figures.py saves it).
FIGURE = "readme-figure"

# --------------------------------------------------------------------------------------- cells every notebook runs


SETUP = """
import json
{math}import os
import tempfile
from pathlib import Path

{plots}import torch
from IPython.display import display
{pil}
from clipcond.demo_layout import find_notebook_demo
from clipcond.plots import image_grid

# The optimizer steps of every model trained below. The default is a smoke test that runs in about a minute on
# 2 CPU cores; its pictures are noise. CLIPCOND_NOTEBOOK_STEPS=300 trains with the recipes of `clipcond demo`.
STEPS = int(os.environ.get("CLIPCOND_NOTEBOOK_STEPS", "10"))
# Under 100 steps the data, models and batches shrink too, so that the smoke test stays a smoke test.
SMALL = STEPS < 100
NUM_IMAGES = 1000 if SMALL else 20000

# A finished `clipcond demo` folder (CLIPCOND_NOTEBOOK_WORKDIR, or ./demo beside the notebook) is shown instead of
# training: its data set and its trained runs are used. It is only read, never written.
DEMO = find_notebook_demo(os.environ.get("CLIPCOND_NOTEBOOK_WORKDIR"), Path.cwd())
DEMO_RUNS = DEMO.finished_runs() if DEMO is not None else {{}}  # run folders by name: clip, decoder, prior, ...

# Everything is written under WORK: a temporary folder, removed by the last cell, unless CLIPCOND_NOTEBOOK_WORKDIR
# names a folder to keep (and not a demo's). Runs found complete there are reused, so the notebooks can share their
# data and CLIP.
if os.environ.get("CLIPCOND_NOTEBOOK_WORKDIR") and DEMO is None:
    _tmp = None
    WORK = Path(os.environ["CLIPCOND_NOTEBOOK_WORKDIR"]).expanduser()
    WORK.mkdir(parents=True, exist_ok=True)
else:
    _tmp = tempfile.TemporaryDirectory(prefix="clipcond-notebook-")
    WORK = Path(_tmp.name)
{require}
# Sampling follows the models shown: few steps and images for smoke-test models, more for a demo's trained ones.
QUICK = SMALL and DEMO is None
if DEMO is not None:
    print(f"Demo folder {{DEMO.root}}: showing its data and runs ({{', '.join(DEMO_RUNS)}}), training none")
else:
    print(f"Training {{STEPS}} steps per model ({{'small' if SMALL else 'recipe'}} settings) in {{WORK}}; no demo folder")
"""

# Notebook 3 shows a demo only when it holds the DALL-E 2 runs.
REQUIRE_DALLE2 = """
if DEMO is not None and not {"prior", "unclip_decoder"} <= DEMO_RUNS.keys():
    print(f"{DEMO.root} holds no DALL-E 2 runs (`clipcond demo --dalle2` trains them): training here instead.")
    DEMO, DEMO_RUNS = None, {}
"""


def setup(plots: bool = False, pil: bool = False, require: str = "") -> str:
    """The first code cell: imports (with matplotlib and numpy, or PIL, where the notebook uses them), the step
    budget, the demo folder shown if there is one (`require` may turn it down) and the working folder."""
    return SETUP.format(
        math="import math\n" if plots else "",
        plots="import matplotlib.pyplot as plt\nimport numpy as np\n" if plots else "",
        pil="from PIL import Image\n" if pil else "",
        require=require,
    )


RUN_ONCE = """
from accelerate.state import AcceleratorState, GradientState

from clipcond.runs import RunRecord


def run_once(main, argv, output_dir):
    \"\"\"Run a clipcond training entry point, unless `output_dir` holds its finished run; return the run record.

    An interrupted run resumes from its latest checkpoint. Every entry point builds its own Accelerator, and
    Accelerate keeps process-wide state: it is reset after each run so that the next one starts clean (as
    `clipcond demo` does between its stages).
    \"\"\"
    record = RunRecord.read_if_present(output_dir)  # clipcond_run.json, read through its type
    if record is not None:
        print(f"reusing {output_dir}:", json.dumps(record.summary))
        return record
    main([*map(str, argv), "--output-dir", str(output_dir), "--resume-from-checkpoint", "latest"])  # prints it
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return RunRecord.read(output_dir)
"""

DATA = """
from clipcond.data import shapes

DATA = DEMO.data if DEMO is not None else WORK / f"shapes-{NUM_IMAGES}"
if shapes.load_dataset_info(DATA) is None:
    shapes.main([str(DATA), "--num-images", str(NUM_IMAGES), "--overwrite"])  # `clipcond data shapes`
info = shapes.load_dataset_info(DATA)
print("held-out colour-shape pairs (test split only):", ", ".join(info["held_out"]))
"""

CLIP = """
from clipcond.train import clip as train_clip

CLIP = DEMO_RUNS.get("clip", WORK / f"clip-{STEPS}")  # a finished run is reused, not trained again
clip_argv = ["--data", DATA, "--max-train-steps", STEPS, "--validation-steps", 0, "--report-to", "tensorboard"]
if SMALL:  # batches of 64 instead of the recipe's 256
    clip_argv += ["--train-batch-size", 64, "--lr-warmup-steps", max(1, STEPS // 10)]
clip_record = run_once(train_clip.main, clip_argv, CLIP)  # `clipcond train clip`
"""

CLEAN_UP_MD = """
## Clean up

The temporary folder goes; a `CLIPCOND_NOTEBOOK_WORKDIR` stays, for the next notebook to reuse.
"""

CLEAN_UP = """
if _tmp is not None:
    _tmp.cleanup()
"""


def budget_note(number: str, demo: str = "`clipcond demo`") -> str:
    return f"""
**Budget.** By default every model trains for `CLIPCOND_NOTEBOOK_STEPS=10` steps, with smaller data, models and
batches, so the notebook runs top to bottom in about a minute on 2 CPU cores (CI executes it so). The pictures are
then noise. For meaningful ones, raise the budget before starting Jupyter, e.g.

```bash
CLIPCOND_NOTEBOOK_STEPS=300 CLIPCOND_NOTEBOOK_WORKDIR=~/clipcond-notebooks jupyter lab notebooks/{number}
```

From 100 steps on the recipes of `clipcond demo` are used (20,000 images, the `tiny` presets, their batch sizes, the
decoders' 2 x 2 pixel blocks) at the budget's step count: expect minutes per model on a laptop's CPU. With
`CLIPCOND_NOTEBOOK_WORKDIR` the folders are kept, and every notebook reuses the data and runs that another one
already trained at the same budget.

**A demo folder.** When `CLIPCOND_NOTEBOOK_WORKDIR` names the finished output folder of {demo}, or a `demo/`
folder of one lies beside the notebook, nothing is trained: the notebook uses the demo's data set and trained runs
(it only reads them; what it writes goes to a temporary folder) and shows real pictures in about a minute. The
first code cell prints which way it goes:

```bash
CLIPCOND_NOTEBOOK_WORKDIR=~/clipcond-demo jupyter lab notebooks/{number}
```
"""


# ------------------------------------------------------------------------------------------------- the notebooks

NB01 = [
    (
        "md",
        dedent(
            """
        # 1. Pretrain a CLIP and look at it

        CLIP (Radford et al. 2021) trains an image encoder and a text encoder together so that an image and its
        caption land close in one embedding space: for a batch of N pairs, the N x N cosine similarities, scaled by a
        learnable temperature, are scored by a symmetric cross-entropy (InfoNCE) whose right answers are the
        diagonal. This notebook trains one on clipcond's built-in shapes data and looks at what it learned:

        1. the data set;
        2. training (`clipcond train clip`) and its loss curve;
        3. zero-shot classification and retrieval (`clipcond eval clip`): the confusion matrix and an image-text
           similarity matrix;
        4. a 2-D projection of image and text embeddings;
        5. search: the test images closest to a text query.
        """
        )
        + budget_note("01_pretrain_clip.ipynb"),
    ),
    ("code", setup(plots=True, pil=True)),
    ("code", RUN_ONCE),
    (
        "md",
        """
        ## The data

        Flat-coloured circles, squares and triangles in 6 colours, 2 sizes and 5 positions, alone or in pairs with a
        spatial relation or a count, captioned in several phrasings. Some colour-shape pairs are *held out*: they
        never appear in a training image or caption, only in the test split, so the test split measures whether the
        model composes colour and shape or memorised pairs.
        """,
    ),
    ("code", DATA),
    (
        "code",
        """
        rows = [json.loads(line) for line in (DATA / "train" / "metadata.jsonl").read_text().splitlines()[:12]]
        images = [Image.open(DATA / "train" / row["file_name"]) for row in rows]
        display(image_grid(images, rows=2, cols=6, labels=[row["text"] for row in rows]))
        """,
    ),
    (
        "md",
        """
        ## Training

        `clipcond.train.clip.main` is the `clipcond train clip` command called in-process: the same arguments, the
        same run folder (a `save_pretrained` CLIPModel with its tokenizer, `clipcond_run.json`, `logs/`).
        `--report-to tensorboard` logs the loss for the curve below.
        """,
    ),
    ("code", CLIP),
    (
        "md",
        """
        The loss of a model that cannot tell the pairs apart is ln(batch size) (every caption equally likely): the
        curve starts there and falls as the encoders learn colours, then shapes. The learned temperature (the
        logit scale, capped at 100) grows as the embeddings separate.
        """,
    ),
    (
        "code",
        """
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        LOGS = CLIP / "logs" / "clipcond"
        batch = clip_record.args["train_batch_size"]
        if LOGS.is_dir():
            events = EventAccumulator(str(LOGS))
            events.Reload()
            fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
            loss = events.Scalars("train/loss")
            left.plot([e.step for e in loss], [e.value for e in loss], label="training loss")
            left.axhline(math.log(batch), color="grey", linestyle="--", label=f"chance: ln {batch}")
            left.set(xlabel="step", ylabel="InfoNCE loss", title="loss")
            left.legend()
            scale = events.Scalars("train/logit_scale")
            right.plot([e.step for e in scale], [e.value for e in scale])
            right.set(xlabel="step", ylabel="exp(logit scale)", title="learned temperature")
            plt.show()
        else:  # `clipcond demo` trains its CLIP without `--report-to`
            summary = clip_record.summary
            print(f"{CLIP} logged no curve; {summary['steps']} steps, final loss {summary['final_loss']:.3f}", end=" ")
            print(f"(chance: ln {batch} = {math.log(batch):.3f}), logit scale {summary['logit_scale']:.1f}")
        """,
    ),
    (
        "md",
        """
        ## Zero-shot classification and retrieval

        `clipcond eval clip` classifies every single-object test image among the 18 colour-shape classes by the
        class whose prompts ("a photo of a red circle.", ... averaged over templates) are closest, and ranks
        images against captions (recall@k). It prints the metrics and writes the figures to `RUN/eval/`, here to
        `--output-dir` in the working folder (a demo folder is only read). Accuracy is reported for seen and held-out compositions apart; chance is 1/18 = 5.6%.
        """,
    ),
    (
        "code",
        """
        from clipcond.evaluation import clip as eval_clip

        CLIP_EVAL = WORK / f"{CLIP.name}-eval"
        eval_argv = ["--model", str(CLIP), "--data", str(DATA), "--output-dir", str(CLIP_EVAL), "--no-progress"]
        eval_clip.main(eval_argv)  # `clipcond eval clip`
        display(Image.open(CLIP_EVAL / "confusion_matrix.png"))
        """,
        FIGURE,
    ),
    (
        "md",
        """
        Rows of the confusion matrix are true classes (held-out ones marked \\*), columns the predictions; a
        model that learned colours but not shapes shows blocks of 3 x 3 along the diagonal. The similarity matrix
        is the cosine of the first test images (rows) with their captions (columns): a trained CLIP has a bright
        diagonal, and bright off-diagonal cells where captions describe the same scene.
        """,
    ),
    ("code", 'display(Image.open(CLIP_EVAL / "similarity_matrix.png"))'),
    (
        "md",
        """
        ## Image and text embeddings in 2-D

        The single-object test images and the 18 class vectors of the zero-shot classifier, projected on their
        first two principal components. On the left, the raw embeddings: images and texts sit in two separate
        clusters, the *modality gap* of contrastive models (Liang et al. 2022). Only directions matter to the
        cosine, so on the right each modality is centred on its own mean and scaled back to unit length first: then
        a class's text vector should sit among its images. Colour is the object's colour, the marker its shape; text vectors are the large
        outlined markers, held-out classes labelled with \\*.
        """,
    ),
    (
        "code",
        """
        import torch.nn.functional as F

        from clipcond.data.folders import ImageCaptionDataset
        from clipcond.evaluation.zero_shot import DEFAULT_TEMPLATES, build_zero_shot_classifier
        from clipcond.models.clip import load_clip

        run = load_clip(CLIP)
        test = ImageCaptionDataset(DATA, split="test", resolution=run.image_size)
        items = [test[i] for i in range(len(test))]
        items = [item for item in items if item["label"]]  # single-object images; label "colour shape"
        image_embeds = run.encode_images(torch.stack([item["pixel_values"] for item in items]))  # (N, D), unit
        classes = shapes.class_names(info)
        text_embeds = build_zero_shot_classifier(run.encode_text, classes, DEFAULT_TEMPLATES)  # (C, D), unit


        def project(images, texts):
            both = torch.cat([images, texts]).numpy()
            both = both - both.mean(axis=0)
            _, _, vt = np.linalg.svd(both, full_matrices=False)  # principal axes of images and texts together
            xy = both @ vt[:2].T
            return xy[: len(images)], xy[len(images) :]


        rgb = {name: np.array(value) / 255 for name, value in info["colours"].items()}
        markers = {"circle": "o", "square": "s", "triangle": "^"}
        centred = [F.normalize(x - x.mean(dim=0), dim=-1) for x in (image_embeds, text_embeds)]
        views = {"raw embeddings": (image_embeds, text_embeds), "each modality centred": centred}
        fig, axes = plt.subplots(1, 2, figsize=(13, 6))
        for ax, (title, (images, texts)) in zip(axes, views.items()):
            image_xy, text_xy = project(images, texts)
            for (x, y), item in zip(image_xy, items):
                colour, shape = item["label"].split()
                ax.scatter(x, y, color=rgb[colour], marker=markers[shape], s=18, alpha=0.6)
            for (x, y), name in zip(text_xy, classes):
                colour, shape = name.split()
                ax.scatter(x, y, color=rgb[colour], marker=markers[shape], s=160, edgecolors="black")
                ax.annotate(name + (" *" if name in info["held_out"] else ""), (x, y), fontsize=7)
            ax.set_title(title)
        plt.show()
        """,
    ),
    (
        "md",
        """
        ## Search

        `clipcond index` embeds every image under a folder once; `clipcond search` embeds a text query and ranks
        the images by cosine. Here the index of the test images is built in memory (`ImageIndex.build`; `save`
        would write it to disk), and each row shows a query's five best images with their cosine. "a blue square"
        and "a purple triangle" are held-out compositions: the CLIP never saw them named together.
        """,
    ),
    (
        "code",
        """
        from clipcond.index import ImageIndex
        from clipcond.search import embed_text_query

        index = ImageIndex.build(DATA / "test", run)
        held_out = {f"a {pair}" for pair in info["held_out"]}
        QUERIES = ["a red circle", "a blue square", "a purple triangle", "a big yellow square on the left"]
        QUERIES += ["two green triangles side by side"]
        TOP_K = 5
        found, labels = [], []
        for query in QUERIES:
            results = index.search(embed_text_query(run, query), top_k=TOP_K)
            found += [Image.open(r.path) for r in results]
            query += " (held out)" if query in held_out else ""
            labels += [f"{query}: {r.score:.2f}" if r.rank == 1 else f"{r.score:.2f}" for r in results]
        display(image_grid(found, rows=len(QUERIES), cols=TOP_K, labels=labels))
        """,
    ),
    ("md", CLEAN_UP_MD),
    ("code", CLEAN_UP),
]

NB02 = [
    (
        "md",
        dedent(
            """
        # 2. The Stable Diffusion path: a decoder on the frozen text encoder

        Stable Diffusion (Rombach et al. 2022) generates with a UNet that denoises an image step by step while
        cross-attending to the per-token states of a *frozen* CLIP text encoder. Here the CLIP is our own (trained
        first, quickly), the UNet is a diffusers `UNet2DConditionModel`, and it denoises pixels of the 32 px shapes
        data directly (no VAE at this size):

        1. data and a CLIP (as notebook 1);
        2. the decoder (`clipcond train decoder`): DDPM's noise-prediction objective, captions dropped to the empty
           prompt 10% of the time so that one model is both conditional and unconditional;
        3. generation with `TextToImagePipeline`, seen and held-out colour-shape prompts;
        4. classifier-free guidance: the same noise at several guidance scales;
        5. schedulers: the same trained UNet sampled by several diffusers samplers.
        """
        )
        + budget_note("02_stable_diffusion_path.ipynb"),
    ),
    ("code", setup()),
    ("code", RUN_ONCE),
    ("md", "## Data and CLIP\n\nAs in notebook 1 (a demo's, or reused from `CLIPCOND_NOTEBOOK_WORKDIR`)."),
    ("code", DATA),
    ("code", CLIP),
    (
        "md",
        """
        ## The decoder

        The text encoder runs once per distinct caption into an embedding cache (`RUN/cache/`), so training steps
        never run it. The run folder is a complete `TextToImagePipeline` (`save_pretrained` layout: `unet/` with
        the EMA weights, `scheduler/`, `text_encoder/`, `tokenizer/`). A low loss says little here: judge the
        images.
        """,
    ),
    (
        "code",
        """
        from clipcond.train import decoder as train_decoder

        DECODER = DEMO_RUNS.get("decoder", WORK / f"decoder-{STEPS}")
        decoder_argv = ["--clip", CLIP, "--data", DATA, "--max-train-steps", STEPS, "--validation-steps", 0]
        if SMALL:  # the `test` UNet at 16 px on batches of 16, instead of `tiny` at the data's 32 px on 64
            decoder_argv += ["--model", "test", "--resolution", 16, "--train-batch-size", 16]
            decoder_argv += ["--lr-warmup-steps", max(1, STEPS // 10)]
        else:  # as the demo's: the pixels as 2 x 2 blocks
            decoder_argv += ["--space-to-depth", 2]
        decoder_record = run_once(train_decoder.main, decoder_argv, DECODER)  # `clipcond train decoder`
        """,
    ),
    (
        "md",
        """
        ## Generating

        Two images for each of six prompts; "a blue square" and "a purple triangle" are held-out compositions that
        neither the CLIP nor the decoder saw in training. One generator per image makes every image reproducible
        on its own, whatever the batch.
        """,
    ),
    (
        "code",
        """
        from clipcond.pipelines import SCHEDULERS, TextToImagePipeline, scheduler_from_name

        pipe = TextToImagePipeline.from_pretrained(DECODER, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        INFERENCE_STEPS = 10 if QUICK else 25
        PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple triangle"]
        PROMPTS += ["an orange square"]
        PER_PROMPT = 2 if QUICK else 4
        held_out = {f"a {pair}" for pair in info["held_out"]}


        def generators(n, seed=0):  # one per image: an image depends on its own seed only, whatever the batch
            return [torch.Generator().manual_seed(seed + i) for i in range(n)]


        def row_labels(names, columns):  # a label under the first image of each row of a grid
            return [name if i == 0 else "" for name in names for i in range(columns)]


        images = pipe(
            PROMPTS,
            num_images_per_prompt=PER_PROMPT,
            num_inference_steps=INFERENCE_STEPS,
            guidance_scale=3.0,
            generator=generators(len(PROMPTS) * PER_PROMPT),
        ).images
        labels = row_labels([p + (" (held out)" if p in held_out else "") for p in PROMPTS], PER_PROMPT)
        display(image_grid(images, rows=len(PROMPTS), cols=PER_PROMPT, labels=labels))
        """,
    FIGURE,
    ),
    (
        "md",
        """
        ## Classifier-free guidance

        Each step the UNet predicts the noise twice, with the prompt and with the empty prompt, and the sampler
        follows `eps_uncond + w (eps_cond - eps_uncond)` (Ho & Salimans 2022). w = 1 is the conditional model
        alone; larger w trades variety for agreement with the prompt, and too large a w oversaturates. Every row
        below uses the same seeds, so only w changes.
        """,
    ),
    (
        "code",
        """
        SCALES = [1.0, 3.0, 8.0] if QUICK else [1.0, 2.0, 3.0, 5.0, 8.0]
        COLUMNS = 3 if QUICK else 4
        rows = []
        for w in SCALES:
            rows += pipe(
                "a green triangle",
                num_images_per_prompt=COLUMNS,
                num_inference_steps=INFERENCE_STEPS,
                guidance_scale=w,
                generator=generators(COLUMNS),
            ).images
        labels = row_labels([f"guidance {w:g}" for w in SCALES], COLUMNS)
        display(image_grid(rows, rows=len(SCALES), cols=COLUMNS, labels=labels))
        """,
    ),
    (
        "md",
        """
        ## Schedulers

        The UNet learned to predict noise under one noise schedule; any sampler built on that schedule can use it.
        `scheduler_from_name` builds one from the saved scheduler's config (betas, prediction type). DDPM is
        ancestral and needs many steps; DDIM, DPM-Solver++ (2M), Euler and UniPC are made for few.
        """,
    ),
    (
        "code",
        """
        import time

        trained = pipe.scheduler
        COLUMNS = 3 if QUICK else 4
        rows, names = [], []
        for name in SCHEDULERS:
            pipe.scheduler = scheduler_from_name(name, trained.config)
            start = time.perf_counter()
            rows += pipe(
                "a red circle",
                num_images_per_prompt=COLUMNS,
                num_inference_steps=INFERENCE_STEPS,
                generator=generators(COLUMNS),
            ).images
            seconds = time.perf_counter() - start
            names.append(f"{name}: {seconds:.1f} s")
        pipe.scheduler = trained
        display(image_grid(rows, rows=len(SCHEDULERS), cols=COLUMNS, labels=row_labels(names, COLUMNS)))
        """,
    ),
    (
        "md",
        """
        `clipcond generate` does the same from the command line, and `clipcond eval generation` scores a decoder
        with an attribute classifier trained on ground-truth renders (colour and shape accuracy, seen and held
        out, per guidance scale), a CLIP score and a Fréchet distance.
        """,
    ),
    ("md", CLEAN_UP_MD),
    ("code", CLEAN_UP),
]

NB03 = [
    (
        "md",
        dedent(
            """
        # 3. The DALL-E 2 path: prior and decoder

        DALL-E 2 (Ramesh et al. 2022, "unCLIP") splits text-to-image in two, through CLIP's image embedding:

        - the **prior** (a diffusers `PriorTransformer`) maps a caption's CLIP text embedding to a CLIP *image*
          embedding: the two are not the same vector (notebook 1 shows the gap);
        - the **decoder** (a `UNet2DConditionModel` with `class_embed_type="projection"`, in the layout of Stable
          unCLIP) draws an image from a CLIP image embedding.

        Because the decoder reads image embeddings, it also makes *variations* of an image (embed it, decode) and
        *interpolations* between two images or two prompts (decode points on the arc between two embeddings).
        This notebook trains both on the frozen CLIP and tries all four.
        """
        )
        + budget_note("03_dalle2_path.ipynb", demo="`clipcond demo --dalle2`"),
    ),
    ("code", setup(pil=True, require=REQUIRE_DALLE2)),
    ("code", RUN_ONCE),
    ("md", "## Data and CLIP\n\nAs in notebook 1 (a demo's, or reused from `CLIPCOND_NOTEBOOK_WORKDIR`)."),
    ("code", DATA),
    ("code", CLIP),
    (
        "md",
        """
        ## The prior and the decoder

        Both CLIP towers run once over the training data into embedding caches; the two runs share one cache
        folder, so the images are embedded once. The prior predicts the unnoised image embedding (DALL-E 2's
        objective); the decoder is trained on the true image embeddings, which it reads through a projection
        added to the timestep embedding and as 4 extra cross-attention tokens. Each run folder is a diffusers
        pipeline: `PriorPipeline` and `ImageVariationPipeline`.
        """,
    ),
    (
        "code",
        """
        from clipcond.train import decoder as train_decoder
        from clipcond.train import prior as train_prior

        CACHE = WORK / "cache"  # CLIP embeddings of the data, keyed by encoder and data: safe to share
        common = ["--clip", CLIP, "--data", DATA, "--max-train-steps", STEPS, "--validation-steps", 0]
        common += ["--cache-dir", CACHE]
        if SMALL:
            common += ["--lr-warmup-steps", max(1, STEPS // 10)]

        PRIOR = DEMO_RUNS.get("prior", WORK / f"prior-{STEPS}")
        prior_argv = common + (["--train-batch-size", 64] if SMALL else [])  # the `tiny` prior either way
        prior_record = run_once(train_prior.main, prior_argv, PRIOR)  # `clipcond train prior`

        UNCLIP = DEMO_RUNS.get("unclip_decoder", WORK / f"unclip-decoder-{STEPS}")
        unclip_argv = common + ["--conditioning", "image-embedding"]
        if SMALL:  # the `test` UNet at 16 px on batches of 16, instead of `tiny` at the data's 32 px on 64
            unclip_argv += ["--model", "test", "--resolution", 16, "--train-batch-size", 16]
        else:  # as the demo's: the pixels as 2 x 2 blocks
            unclip_argv += ["--space-to-depth", 2]
        # `clipcond train decoder --conditioning image-embedding`
        unclip_record = run_once(train_decoder.main, unclip_argv, UNCLIP)
        """,
    ),
    (
        "md",
        """
        ## Is the prior any good?

        `clipcond eval prior` samples an image embedding for each test caption and compares it with the true
        embedding of the caption's image. Two baselines frame the number: the caption's own text embedding (what
        a decoder would get without a prior) and the embedding of a random other image. A useful prior beats both;
        the predicted embeddings of single-object captions are also classified zero-shot.
        """,
    ),
    (
        "code",
        """
        from clipcond.evaluation import prior as eval_prior

        eval_argv = ["--model", str(PRIOR), "--data", str(DATA), "--cache-dir", str(CACHE), "--no-progress"]
        eval_argv += ["--output-dir", str(WORK / f"{PRIOR.name}-eval")]  # not RUN/eval: a demo is only read
        eval_argv += ["--max-captions", "64" if QUICK else "512"]
        if QUICK:
            eval_argv += ["--num-inference-steps", "10"]
        eval_prior.main(eval_argv);  # `clipcond eval prior`
        """,
    ),
    (
        "md",
        """
        ## Text to image: prior, then decoder

        `UnCLIPTextToImagePipeline.from_runs` pairs the two run folders into one pipeline, after checking that they
        were trained on the same CLIP. Each stage has its own guidance scale and step count. Every image draws its
        own embedding from the prior, so images of one prompt differ more than with the text decoder.
        """,
    ),
    (
        "code",
        """
        from clipcond.pipelines import ImageVariationPipeline, UnCLIPTextToImagePipeline

        unclip = UnCLIPTextToImagePipeline.from_runs(PRIOR, UNCLIP, local_files_only=True)
        unclip.set_progress_bar_config(disable=True)
        INFERENCE_STEPS = 10 if QUICK else 25
        PROMPTS = ["a red circle", "a blue square", "a green triangle", "a purple triangle"]
        PER_PROMPT = 2 if QUICK else 4
        held_out = {f"a {pair}" for pair in info["held_out"]}


        def generators(n, seed=0):  # one per image: an image depends on its own seed only, whatever the batch
            return [torch.Generator().manual_seed(seed + i) for i in range(n)]


        def row_labels(names, columns):  # a label under the first image of each row of a grid
            return [name if i == 0 else "" for name in names for i in range(columns)]


        images = unclip(
            PROMPTS,
            num_images_per_prompt=PER_PROMPT,
            num_inference_steps=INFERENCE_STEPS,
            prior_num_inference_steps=INFERENCE_STEPS,
            generator=generators(len(PROMPTS) * PER_PROMPT),
        ).images
        labels = row_labels([p + (" (held out)" if p in held_out else "") for p in PROMPTS], PER_PROMPT)
        display(image_grid(images, rows=len(PROMPTS), cols=PER_PROMPT, labels=labels))
        """,
    ),
    (
        "md",
        """
        ## Variations

        The decoder alone, as an `ImageVariationPipeline`: each single-object test image (first column) is
        embedded by the frozen CLIP image encoder and decoded from fresh noise. What a variation keeps is what the
        embedding encodes: with a well-trained CLIP, colour and shape stay while the exact position and size may
        move.
        """,
    ),
    (
        "code",
        """
        variation = ImageVariationPipeline.from_pretrained(UNCLIP, local_files_only=True)
        variation.set_progress_bar_config(disable=True)
        rows = [json.loads(line) for line in (DATA / "test" / "metadata.jsonl").read_text().splitlines()]
        rows = [row for row in rows if row["label"]][:4]  # single-object images
        sources = [Image.open(DATA / "test" / row["file_name"]).convert("RGB") for row in rows]
        PER_SOURCE = 3
        variations = variation(
            image=sources,
            num_images_per_prompt=PER_SOURCE,
            num_inference_steps=INFERENCE_STEPS,
            generator=generators(len(sources) * PER_SOURCE),
        ).images
        grid, labels = [], []
        for k, (source, row) in enumerate(zip(sources, rows)):
            grid += [source, *variations[k * PER_SOURCE : (k + 1) * PER_SOURCE]]
            labels += [row["text"]] + [""] * PER_SOURCE
        display(image_grid(grid, rows=len(sources), cols=PER_SOURCE + 1, labels=labels))
        """,
        FIGURE,
    ),
    (
        "md",
        """
        ## Interpolations

        Frames decode points on the great-circle arc between two embeddings (slerp), all from the same noise, so
        that only the embedding changes along a row. Between two images, the endpoints are their CLIP image
        embeddings; between two prompts, the prior samples the endpoints.
        """,
    ),
    (
        "code",
        """
        FRAMES = 5 if QUICK else 8
        between_images = variation.interpolate(
            image=sources[:2],
            num_frames=FRAMES,
            num_inference_steps=INFERENCE_STEPS,
            generator=torch.Generator().manual_seed(0),
        )
        between_prompts = unclip.interpolate(
            prompt=["a red circle", "a blue triangle"],
            num_frames=FRAMES,
            num_inference_steps=INFERENCE_STEPS,
            prior_num_inference_steps=INFERENCE_STEPS,
            generator=torch.Generator().manual_seed(0),
        )
        frames = [*between_images.images, *between_prompts.images]
        labels = [f"images, t={t:.2f}" for t in between_images.t]
        labels += [f"prompts, t={t:.2f}" for t in between_prompts.t]
        display(image_grid(frames, rows=2, cols=FRAMES, labels=labels))
        """,
    ),
    (
        "md",
        """
        From the command line: `clipcond generate --prior PRIOR --model DECODER`, `clipcond vary` and
        `clipcond interpolate`.
        """,
    ),
    ("md", CLEAN_UP_MD),
    ("code", CLEAN_UP),
]

NOTEBOOKS = {
    "01_pretrain_clip.ipynb": NB01,
    "02_stable_diffusion_path.ipynb": NB02,
    "03_dalle2_path.ipynb": NB03,
}


def build(cells: list[tuple[str, ...]], prefix: str) -> nbformat.NotebookNode:
    """A notebook without outputs or execution counts; cell ids are stable (prefix + index), so rebuilds diff
    only where a cell changed. A cell is (kind, source, *tags); FIGURE tags the README's figure."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source, *tags) in enumerate(cells):
        source = dedent(source).strip()
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        cell.id = f"{prefix}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else list(NOTEBOOKS)
    for name in names:
        if name not in NOTEBOOKS:
            raise ValueError(f"unknown notebook {name!r}; this script writes {sorted(NOTEBOOKS)}")
        nbformat.write(build(NOTEBOOKS[name], prefix=f"nb{name[:2]}"), HERE / name)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
