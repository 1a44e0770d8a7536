"""`clipcond generate` in-process on a tiny saved pipeline folder (the layout the decoder training writes)."""

import errno
import json
import logging
import re

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModelWithProjection

import clipcond.image_files as image_files_module
from clipcond import cli
from clipcond.generate import main
from clipcond.image_files import write_outputs
from clipcond.models.unet import create_unet, unet_config
from clipcond.pipeline_loading import DEFAULT_SAMPLER, SAVED_SCHEDULER, SCHEDULER_NAMES
from clipcond.pipelines import SCHEDULERS, TextToImagePipeline
from clipcond.pipelines.inputs import DEFAULT_TEXT_GUIDANCE_SCALE
from clipcond.storage import DiskFullError

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SIZE = 16
FAST = ["--num-inference-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def pipeline_dir(tiny_clip_run, tmp_path_factory):
    text_encoder = CLIPTextModelWithProjection.from_pretrained(tiny_clip_run, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_run, local_files_only=True)
    torch.manual_seed(0)
    unet = create_unet(unet_config("test", sample_size=SIZE, cross_attention_dim=text_encoder.config.hidden_size))
    pipe = TextToImagePipeline(unet=unet, scheduler=DDPMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("t2i_pipeline")
    pipe.save_pretrained(path)
    return path


def _refuse(constant):
    raise ValueError(f"images.jsonl holds {constant}, which is not JSON")


def read_records(folder) -> list[dict]:
    """The records of images.jsonl, read as strict JSON (NaN and Infinity refused)."""
    lines = (folder / "images.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=_refuse) for line in lines]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_writes_images_grid_and_records(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(pipeline_dir), "--prompt", "a red circle", "--prompt", "", "--num-images", "2"]
    assert main([*args, "--seed", "10", "--batch-size", "3", "--output-dir", str(out), *FAST]) == 0

    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
    assert Image.open(out / "00000.png").size == (SIZE, SIZE)
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 96 and grid.height > 2 * 96  # 2 x 2 tiles of at least 96 px, with labels

    records = read_records(out)
    assert [r["file_name"] for r in records] == names[:4]
    assert [r["prompt"] for r in records] == ["a red circle", "a red circle", "", ""]
    assert [r["seed"] for r in records] == [10, 11, 12, 13]
    assert records[0] == {
        "file_name": "00000.png",
        "prompt": "a red circle",
        "negative_prompt": None,
        "seed": 10,
        "num_inference_steps": 2,
        "guidance_scale": DEFAULT_TEXT_GUIDANCE_SCALE,  # a text-to-image decoder's default
        "scheduler": DEFAULT_SAMPLER,  # the evaluations' sampler, not the run's saved DDPM
        "model": str(pipeline_dir),
        "dtype": "fp32",
    }
    assert "4 images (2 prompts x 2)" in capsys.readouterr().out

    # Image k alone, from its record, is the image k of the batch (here batched as [0, 1, 2] and [3]).
    for k in (1, 3):
        again = tmp_path / f"again{k}"
        record = records[k]
        single = ["--model", str(pipeline_dir), "--prompt", record["prompt"], "--seed", str(record["seed"])]
        main([*single, "--num-images", "1", "--output-dir", str(again), *FAST])
        assert np.abs(pixels(again / "00000.png") - pixels(out / record["file_name"])).max() <= 1


def test_prompts_file_scheduler_and_negative_prompt(pipeline_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a blue square\n\n  a green triangle  \n")
    out = tmp_path / "out"
    args = ["--model", str(pipeline_dir), "--prompt", "a red circle", "--prompts-file", str(prompts_file)]
    main(
        [
            *args,
            "--num-images",
            "1",
            "--scheduler",
            "dpm",
            "--negative-prompt",
            "a star",
            "--output-dir",
            str(out),
            *FAST,
        ]
    )
    records = read_records(out)
    assert [r["prompt"] for r in records] == ["a red circle", "a blue square", "a green triangle"]
    assert {r["scheduler"] for r in records} == {"dpm"} and {r["negative_prompt"] for r in records} == {"a star"}
    assert len(list(out.glob("0*.png"))) == 3


def test_saved_scheduler_keeps_the_runs_own(pipeline_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(pipeline_dir), "--prompt", "a red circle", "--num-images", "1", "--output-dir", str(out)]
    main([*argv, "--scheduler", SAVED_SCHEDULER, *FAST])
    assert [r["scheduler"] for r in read_records(out)] == ["ddpm"]  # the DDPMScheduler the run was saved with


def test_long_prompt_is_truncated_with_a_warning(pipeline_dir, tmp_path, caplog):
    long_prompt = " ".join(["a red circle"] * 20)
    with caplog.at_level(logging.WARNING, logger="clipcond.conditioning"):
        main(
            [
                "--model",
                str(pipeline_dir),
                "--prompt",
                long_prompt,
                "--num-images",
                "1",
                "--output-dir",
                str(tmp_path / "out"),
                *FAST,
            ]
        )
    assert "truncated" in caplog.text and "context of 32" in caplog.text


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--prompt", "x", "--num-images", "0"], ValueError, r"`--num-images` must be >= 1, got 0"),
        (["--prompt", "x", "--batch-size", "0"], ValueError, r"`--batch-size` must be >= 1, got 0"),
        ([], ValueError, r"no prompt given"),
        (["--prompts-file", "missing.txt"], FileNotFoundError, r"`--prompts-file` 'missing.txt' does not exist"),
        (["--prompt", "x", "--dtype", "fp16"], ValueError, r"`--dtype fp16` needs a CUDA device"),
        (["--prompt", "x", "--guidance-scale", "-2"], ValueError, r"`guidance_scale` must be a number >= 0"),
    ],
)
def test_user_errors(pipeline_dir, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        main(["--model", str(pipeline_dir), *extra, "--output-dir", str(tmp_path / "out"), *FAST])


def test_missing_or_wrong_model_folder(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=rf"`--model` '{missing}' does not exist"):
        main(["--model", str(missing), "--prompt", "x", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"holds no model_index.json"):
        main(["--model", str(tmp_path), "--prompt", "x", "--output-dir", str(tmp_path / "out")])


def test_argument_errors_come_before_the_model_is_looked_at(tmp_path):
    missing = tmp_path / "no_such_run"
    argv = ["--model", str(missing), "--prompt", "x", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"`--num-inference-steps` must be >= 1, got 0"):
        main([*argv, "--num-inference-steps", "0"])


def test_cli_dispatch_reports_user_errors(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert cli.main(["generate", "--model", str(missing), "--prompt", "x", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"clipcond generate: error: `--model` '{missing}' does not exist"


def test_scheduler_choices_match_the_pipeline():
    assert list(SCHEDULER_NAMES) == sorted(SCHEDULERS)


def test_write_outputs(tmp_path):
    images = [Image.new("RGB", (8, 8), colour) for colour in ("red", "green", "blue")]
    records = [{"file_name": f"{i:05d}.png", "prompt": "p"} for i in range(3)]
    grid_path = write_outputs(images, records, tmp_path / "out", grid_rows=1, labels=["a", "b", "c"])
    assert grid_path == tmp_path / "out" / "grid.png" and grid_path.is_file()
    assert np.asarray(Image.open(tmp_path / "out" / "00002.png"))[0, 0].tolist() == [0, 0, 255]
    assert read_records(tmp_path / "out") == records
    with pytest.raises(ValueError, match="got 2 images but 3 records"):
        write_outputs(images[:2], records, tmp_path / "out", grid_rows=1)


@pytest.fixture
def pipeline_calls(monkeypatch):
    """The prompts of each call of the text-to-image pipeline; `fail_on[0]`: the call (1-based) that raises."""
    calls, fail_on = [], [None]
    original = TextToImagePipeline.__call__

    def recording(self, prompt, *args, **kwargs):
        calls.append(list(prompt))
        if len(calls) == fail_on[0]:
            raise RuntimeError(f"pipeline call {len(calls)} failed")
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(TextToImagePipeline, "__call__", recording)
    return calls, fail_on


def test_a_failure_keeps_the_batches_drawn_before_it(pipeline_dir, tmp_path, pipeline_calls):
    calls, fail_on = pipeline_calls
    fail_on[0] = 2
    out = tmp_path / "out"
    args = ["--model", str(pipeline_dir), "--prompt", "a red circle", "--num-images", "5", "--batch-size", "2"]
    with pytest.raises(RuntimeError, match="pipeline call 2 failed"):
        main([*args, "--output-dir", str(out), *FAST])
    assert len(calls) == 2
    # the first batch is on disk, whole: its two images and their two records
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "images.jsonl"]
    assert [(r["file_name"], r["seed"]) for r in read_records(out)] == [("00000.png", 0), ("00001.png", 1)]
    assert Image.open(out / "00001.png").size == (SIZE, SIZE)


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_an_unusable_output_dir_is_refused_before_drawing(pipeline_dir, tmp_path, capsys, pipeline_calls, under):
    calls, _ = pipeline_calls
    taken = tmp_path / "taken"
    taken.write_text("a file")
    out = taken / "out" if under else taken
    argv = ["generate", "--model", str(pipeline_dir), "--prompt", "x", "--output-dir", str(out), *FAST]
    assert cli.main(argv) == 2
    if under:
        what = f"cannot be made: '{taken}' is a file, not a folder; pass a folder elsewhere"
    else:
        what = "is a file, not a folder; pass a folder (made if absent)"
    assert capsys.readouterr().err == f"clipcond generate: error: `--output-dir` '{out}' {what}\n"
    assert calls == [] and taken.read_text() == "a file"


def test_a_full_disk_names_the_file(pipeline_dir, tmp_path, capsys, full_disk_at_image):
    full_disk_at_image("00002.png")
    out = tmp_path / "out"
    args = ["--model", str(pipeline_dir), "--prompt", "a red circle", "--num-images", "3", "--batch-size", "2"]
    with pytest.raises(DiskFullError, match=rf"no space left on device while writing {out / '00002.png'} \("):
        main([*args, "--output-dir", str(out), *FAST])
    # the batch before is kept; the failed image is not left half-written, nor recorded
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "images.jsonl"]
    assert [r["file_name"] for r in read_records(out)] == ["00000.png", "00001.png"]

    # through the command: one line, exit status 2
    assert cli.main(["generate", *args, "--output-dir", str(tmp_path / "again"), *FAST]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after diffusers' loading bar
    path = re.escape(str(tmp_path / "again" / "00002.png"))
    assert re.fullmatch(
        rf"clipcond generate: error: no space left on device while writing {path} \([0-9.]+ MB free\); free some "
        r"space and run the command again \(what was saved before is intact\)",
        last,
    )


class _HalfWriter:
    """A file whose write stores half the text, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, text):
        self.file.write(text[: len(text) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_recording_leaves_whole_lines(pipeline_dir, tmp_path, monkeypatch):
    appends = []

    def open_failing_second_append(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115 (handed to the caller, which closes it)
        appends.append(mode == "a")
        return _HalfWriter(file) if mode == "a" and sum(appends) == 2 else file

    monkeypatch.setattr(image_files_module, "open", open_failing_second_append, raising=False)
    out = tmp_path / "out"
    args = ["--model", str(pipeline_dir), "--prompt", "a red circle", "--num-images", "3", "--batch-size", "2"]
    with pytest.raises(DiskFullError, match=f"while writing {out / 'images.jsonl'}"):
        main([*args, "--output-dir", str(out), *FAST])
    assert sum(appends) == 2
    assert [r["file_name"] for r in read_records(out)] == ["00000.png", "00001.png"]  # no half line after them
