"""NaN and infinity refused where numbers come in (every float flag, the pipelines' arguments, loaded embedding
caches), strict JSON where they go out, and output folders checked before any work (issue 17, points 5 and 6)."""

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection

from clipcond import cli
from clipcond.conditioning import ImageEmbeddingCache, TextEmbeddingCache
from clipcond.data.folders import ImageCaptionDataset
from clipcond.finite import check_finite_tensor, finite_or_null
from clipcond.models.clip import load_vision_tower
from clipcond.pipelines.inputs import check_guidance_scale, check_sampling_args
from clipcond.storage import check_output_dir, dumps_json
from clipcond.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
NON_FINITE = ["nan", "inf", "-inf"]


def strict_json(text: str):
    """`json.loads` that refuses NaN and Infinity, as a reader in another language does."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def parse_error(argv, capsys) -> str:
    """The one error line argparse prints for `clipcond ARGV` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------- float flags


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--model", "m", "--prompt", "x", "--output-dir", "o", "--guidance-scale"],
        ["generate", "--model", "m", "--prompt", "x", "--output-dir", "o", "--prior-guidance-scale"],
        ["vary", "a.png", "--model", "m", "--output-dir", "o", "--guidance-scale"],
        ["interpolate", "--model", "m", "--images", "a", "b", "--output-dir", "o", "--guidance-start"],
        ["eval", "generation", "--model", "m", "--data", "d", "--guidance-scale"],
    ],
    ids=lambda c: " ".join(c[:1] + c[-1:]) if isinstance(c, list) else c,
)
def test_sampling_float_flags_refuse_non_finite_values(command, value, capsys):
    *argv, flag = command
    assert parse_error([*argv, f"{flag}={value}"], capsys) == (
        f"clipcond {' '.join(command[:2] if command[0] == 'eval' else command[:1])}: error: argument {flag}: "
        f"must be a finite number, got '{value}'"
    )


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(
    ("stage", "flag"),
    [
        ("clip", "--learning-rate"),
        ("clip", "--grayscale-prob"),
        ("clip", "--random-crop-scale"),
        ("clip", "--hflip-prob"),
        ("decoder", "--snr-gamma"),
        ("decoder", "--ema-decay"),
        ("prior", "--caption-dropout"),
        ("prior", "--adam-beta2"),
    ],
)
def test_training_float_flags_refuse_non_finite_values(stage, flag, value, capsys):
    argv = ["train", stage, "--data", "d", "--output-dir", "o", f"{flag}={value}"]  # "-inf" alone reads as a flag
    if stage != "clip":
        argv += ["--clip", "c"]
    message = parse_error(argv, capsys)
    assert message == f"clipcond train {stage}: error: argument {flag}: must be a finite number, got '{value}'"


def test_a_finite_value_still_parses():
    from clipcond.generate import parse_args

    args = parse_args(["--model", "m", "--prompt", "x", "--output-dir", "o", "--guidance-scale=-1e-3"])
    assert args.guidance_scale == -1e-3


def test_no_flag_parses_with_a_bare_float():
    """Every float flag of every command goes through `finite_float` (a bare `type=float` takes 'nan')."""
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("clipcond", "train", "pipelines")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "type=float" in line.replace(" ", "")
    ]
    assert found == []


# ----------------------------------------------------------------------------------------- Python arguments


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_pipeline_checks_refuse_non_finite_guidance(value):
    with pytest.raises(ValueError, match=rf"`guidance_scale` must be a number >= 0 \(finite; .*got {value}"):
        check_sampling_args(2, value, 1, None, batch_size=1)
    with pytest.raises(ValueError, match=rf"`prior_guidance_scale` must be .*got {value}"):
        check_guidance_scale(value, "prior_guidance_scale")
    check_guidance_scale(0.0)  # the bound itself is allowed


@pytest.mark.parametrize("text", ["1,nan", "inf", "3,-inf"])
def test_guidance_scales_list_refuses_non_finite_values(text):
    from clipcond.evaluation.generation import _parse_scales

    with pytest.raises(ValueError, match=rf"^`--guidance-scales` must be finite numbers, got '{text}'$"):
        _parse_scales(text)
    assert _parse_scales("1, 3.5") == [1.0, 3.5]


def test_check_finite_tensor_names_the_tensor_and_the_row():
    check_finite_tensor(torch.ones(3, 4), "x")
    bad = torch.ones(3, 4)
    bad[1, 2], bad[2, 0] = math.nan, math.inf
    with pytest.raises(ValueError, match=r"^`image_embeds` holds 2 non-finite value\(s\) .*first in row 1; fix it$"):
        check_finite_tensor(bad, "`image_embeds`", "fix it")


# --------------------------------------------------------------------------------------------- strict JSON


def test_figures_that_are_not_numbers_are_written_as_null():
    figures = {"loss": math.nan, "rows": [1.5, math.inf, (2, -math.inf)], "nested": {"fd": math.nan, "n": 3}}
    assert finite_or_null(figures) == {"loss": None, "rows": [1.5, None, [2, None]], "nested": {"fd": None, "n": 3}}
    assert strict_json(dumps_json(finite_or_null(figures)))["loss"] is None
    with pytest.raises(ValueError, match="Out of range float"):
        dumps_json(figures)  # left as they are, they are refused rather than written as NaN


# --------------------------------------------------------------------------------------------- output folders


def test_check_output_dir(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=rf"^`--output-dir` '{a_file}' is a file, not a folder"):
        check_output_dir(a_file)
    under = a_file / "sub" / "out"
    with pytest.raises(ValueError, match=rf"^`OUT` '{under}' cannot be made: '{a_file}' is a file"):
        check_output_dir(under, "OUT")
    check_output_dir(tmp_path / "new" / "deeper")  # made later, by the command: nothing is made here
    assert not (tmp_path / "new").exists()
    check_output_dir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_dir_refuses_a_folder_it_cannot_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ValueError, match="is not writable: its parent"):
            check_output_dir(locked / "out")
    finally:
        locked.chmod(0o700)


def _folders(tmp_path):
    """An existing folder (standing in for a model or data folder: only its existence is checked first), one with
    an empty model_index.json, and a file where an output folder is asked for."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    a_file = tmp_path / "taken"
    a_file.write_text("a file")
    return str(folder), str(a_file)


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--model", "{folder}", "--prompt", "x"],
        ["vary", "{folder}/model_index.json", "--model", "{folder}"],
        ["interpolate", "--model", "{folder}", "--images", "a.png", "b.png"],
        ["index", "{folder}", "--model", "{folder}", "--output", "{out}"],
        ["eval", "clip", "--model", "{folder}", "--data", "{folder}"],
        ["eval", "prior", "--model", "{folder}", "--data", "{folder}"],
        ["eval", "unclip", "--decoder", "{folder}", "--prior", "{folder}", "--data", "{folder}"],
        ["eval", "generation", "--model", "{folder}", "--data", "{folder}"],
        ["data", "convert", "{folder}"],
        ["data", "shapes", "{out}"],
        ["demo"],
        ["train", "clip", "--data", "{folder}"],
        ["train", "decoder", "--data", "{folder}", "--clip", "{folder}"],
        ["train", "prior", "--data", "{folder}", "--clip", "{folder}"],
    ],
    ids=lambda c: " ".join(c[:2] if c[0] in ("eval", "data", "train") else c[:1]),
)
def test_an_unusable_output_folder_is_refused_before_any_work(command, under, tmp_path, capsys):
    folder, a_file = _folders(tmp_path)
    out = os.path.join(a_file, "run") if under else a_file
    argv = [arg.format(folder=folder, out=out) for arg in command]
    flag = "--output" if command[0] == "index" else "OUT" if command[:2] == ["data", "shapes"] else "--output-dir"
    if "{out}" not in command:
        argv += ["--output-dir", out]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    what = f"cannot be made: '{a_file}' is a file" if under else "is a file, not a folder"
    assert err.count("\n") == 1 and f"error: `{flag}` '{out}' {what}" in err
    assert Path(a_file).read_text() == "a file"


# ------------------------------------------------------------------------------------------- embedding caches


CAPTIONS = ["a red circle", "a blue square"]


def _poison(path: Path, name: str) -> None:
    """Set the first value of tensor `name` of a safetensors file to NaN, keeping its metadata."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors[name].view(-1)[0] = math.nan
    save_file(tensors, path, metadata=metadata)


def test_a_text_cache_with_nan_is_refused_by_name_and_rebuilt(tiny_clip_run, tmp_path, caplog):
    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_clip_run).eval()
    tokenizer = load_tokenizer(tiny_clip_run)
    cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    expected = cache.embeddings.pooled  # read before the damage: the cache reads rows from its files
    _poison(next(cache.path.glob("shard-*.safetensors")), "pooled")
    with caplog.at_level(logging.WARNING, logger="clipcond.conditioning"):
        rebuilt = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    assert f"cache {cache.path} cannot be used (its tensor 'pooled' holds 1 non-finite value(s)" in caplog.text
    assert "rebuilding" in caplog.text
    assert torch.isfinite(rebuilt.embeddings.pooled).all()
    assert torch.equal(rebuilt.embeddings.pooled, expected)

    # an encoder that gives NaN is not cached at all
    with torch.no_grad():
        encoder.text_projection.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"the text encoder's output \(to be cached in .*\) holds .* not cached"):
        TextEmbeddingCache.build_or_load(encoder, tokenizer, ["a green triangle"], tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 1  # the first cache only


def test_an_image_cache_with_nan_is_refused_by_name_and_rebuilt(tiny_clip_run, shapes_data, tmp_path, caplog):
    model, mean, std = load_vision_tower(tiny_clip_run)
    dataset = ImageCaptionDataset(shapes_data, split="test")

    def build():
        return ImageEmbeddingCache.build_or_load(
            model, dataset, tmp_path, image_mean=mean, image_std=std, progress=False
        )

    cache = build()
    _poison(cache.path, "embeddings")
    with caplog.at_level(logging.WARNING, logger="clipcond.conditioning"):
        rebuilt = build()
    message = f"cache {cache.path} cannot be used (its tensor 'embeddings' holds 1 non-finite value(s) (NaN or "
    assert message + "infinity), the first in row 0); rebuilding it" in caplog.text
    assert torch.equal(rebuilt.embeddings, cache.embeddings)
