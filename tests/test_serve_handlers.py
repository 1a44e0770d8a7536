"""`clipcond serve`'s request handlers (`clipcond.app.handlers`) on tiny saved runs, without a browser: what each tab
draws matches the commands (images and records), and bad input is refused with a message naming the field."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcond import cli
from clipcond.app import handlers
from clipcond.app.handlers import DALLE2, STABLE_DIFFUSION, RequestError
from clipcond.app.runs import RunPaths, ServedRuns, paths_from_flags
from clipcond.lineage import content_hash

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

FAST = {"steps": 2}


@pytest.fixture(scope="module")
def captioner_run(tiny_captioner, tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioner_run")
    tiny_captioner.save_pretrained(folder)
    (folder / "clipcond_run.json").write_text(json.dumps({"kind": "clipcond-captioner", "summary": {"steps": 0}}))
    return folder


@pytest.fixture(scope="module")
def index(tiny_clip_run, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_index") / "index"
    argv = ["index", str(shapes_data / "test"), "--model", str(tiny_clip_run), "--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def served(pipeline_run, unclip_runs, captioner_run, index, tmp_path_factory):
    paths = paths_from_flags(
        [str(pipeline_run), str(unclip_runs["decoder"])], unclip_runs["prior"], index=index, captioner=captioner_run
    )
    return ServedRuns(paths, output_dir=tmp_path_factory.mktemp("served"), device="cpu")


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "images.jsonl").read_text().splitlines()]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def broken_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")
    return path


def test_tabs_follow_the_runs_served(served):
    assert served.tabs == ["Generate", "Vary", "Search", "Caption", "Compare"]
    assert handlers.text_paths(served) == [STABLE_DIFFUSION, DALLE2]
    only_search = ServedRuns(RunPaths(index=served.paths.index), output_dir=served.output_dir, device="cpu")
    assert only_search.tabs == ["Search"]


@pytest.mark.parametrize("path", [STABLE_DIFFUSION, DALLE2])
def test_generate_draws_what_clipcond_generate_draws(served, path, pipeline_run, unclip_runs, tmp_path):
    progress = []
    drawn = handlers.generate(
        served, path, "  a red circle ", seed=3, num_images=2, progress=lambda *a: progress.append(a), **FAST
    )
    model = pipeline_run if path == STABLE_DIFFUSION else unclip_runs["decoder"]
    argv = ["generate", "--model", str(model), "--prompt", "a red circle", "--seed", "3", "--num-images", "2"]
    argv += ["--num-inference-steps", "2", "--device", "cpu", "--output-dir", str(tmp_path)]
    if path == DALLE2:
        argv += ["--prior", str(unclip_runs["prior"])]
    assert cli.main(argv) == 0

    assert drawn.records == read_records(tmp_path) == read_records(drawn.folder)
    assert [r["seed"] for r in drawn.records] == [3, 4] and progress == [(2, 2)]
    assert ("prior" in drawn.records[0]) == (path == DALLE2)
    for record, image in zip(drawn.records, drawn.images):
        np.testing.assert_array_equal(pixels(tmp_path / record["file_name"]), np.asarray(image))
    assert all(f.is_file() for f in drawn.files) and drawn.files[-1].name == "images.jsonl"
    assert (drawn.folder / "grid.png").is_file()


def test_each_request_writes_a_folder_of_its_own(served):
    first = handlers.generate(served, STABLE_DIFFUSION, "a red circle", num_images=1, **FAST)
    second = handlers.generate(served, STABLE_DIFFUSION, "a red circle", num_images=1, **FAST)
    assert first.folder != second.folder and first.folder.parent == second.folder.parent == served.output_dir


def test_a_scheduler_lasts_one_request(served, shapes_data):
    saved = served.text_to_image.scheduler
    drawn = handlers.generate(served, STABLE_DIFFUSION, "a red circle", num_images=1, scheduler="ddim", **FAST)
    assert drawn.records[0]["scheduler"] == "ddim"
    assert served.text_to_image.scheduler is saved
    saved = served.variation.scheduler
    source = str(sorted((shapes_data / "test").glob("*.png"))[0])
    assert handlers.vary(served, source, num_images=1, scheduler="euler", **FAST).records[0]["scheduler"] == "euler"
    row = handlers.interpolate(served, image_a=source, image_b=source, frames=2, scheduler="unipc", **FAST)
    assert row.records[0]["scheduler"] == "unipc" and served.variation.scheduler is saved


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"prompt": "   "}, "`prompt` is empty"),
        ({"steps": 0}, "`steps` must be a whole number from 1 to 250, got 0"),
        ({"steps": 1000}, "`steps` must be a whole number from 1 to 250, got 1000"),
        ({"steps": 2.5}, "`steps` must be a whole number"),
        ({"steps": None}, "`steps` must be a whole number"),
        ({"num_images": 17}, "`images` must be a whole number from 1 to 16, got 17"),
        ({"seed": -1}, "`seed` must be a whole number"),
        ({"guidance_scale": math.nan}, "`guidance scale` must be a number from 0 to 50, got nan"),
        ({"scheduler": "bogus"}, "`scheduler` must be 'saved' or one of"),
        ({"path": "the moon"}, "`path` 'the moon' is not served here"),
    ],
)
def test_generate_refuses_bad_input_by_name(served, values, message):
    request = {"path": STABLE_DIFFUSION, "prompt": "a red circle", "num_images": 1, **FAST, **values}
    with pytest.raises(RequestError) as err:
        handlers.generate(served, **request)
    assert message in str(err.value)


def test_vary_draws_what_clipcond_vary_draws(served, unclip_runs, shapes_data, tmp_path):
    source = sorted((shapes_data / "test").glob("*.png"))[0]
    drawn = handlers.vary(served, str(source), seed=1, num_images=2, **FAST)
    argv = ["vary", str(source), "--model", str(unclip_runs["decoder"]), "--seed", "1", "--num-images", "2"]
    assert cli.main([*argv, "--num-inference-steps", "2", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0

    expected = read_records(tmp_path)
    assert [{**r, "source": None} for r in drawn.records] == [{**r, "source": None} for r in expected]
    assert drawn.records[0]["source"] == source.name  # an upload's own name, not its temporary path
    assert len(drawn.images) == 3 and drawn.labels[0] == "source"  # the source first
    for record, image in zip(expected, drawn.images[1:]):
        np.testing.assert_array_equal(pixels(tmp_path / record["file_name"]), np.asarray(image))


def test_uploads_that_are_not_images_are_refused_by_name(served, broken_file, tmp_path):
    with pytest.raises(RequestError, match=r"`image` 'broken.png' cannot be read as an image"):
        handlers.vary(served, str(broken_file), **FAST)
    with pytest.raises(RequestError, match=r"`image`: upload an image"):
        handlers.vary(served, None, **FAST)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 4000)).save(huge)
    with pytest.raises(RequestError, match=r"'huge.png' is 5000x4000 pixels; the limit is"):
        handlers.vary(served, str(huge), **FAST)
    heavy = tmp_path / "heavy.png"
    heavy.write_bytes(b"\0" * (handlers.MAX_UPLOAD_BYTES + 1))
    with pytest.raises(RequestError, match=r"'heavy.png' is 25.0 MiB; the limit is 25 MiB"):
        handlers.vary(served, str(heavy), **FAST)


def test_interpolate_rows_between_prompts_and_between_images(served, shapes_data):
    row = handlers.interpolate(served, "a red circle", "a blue square", frames=3, **FAST)
    assert len(row.images) == 3 and [r["t"] for r in row.records] == [0.0, 0.5, 1.0]
    assert row.records[0]["prompts"] == ["a red circle", "a blue square"] and row.records[0]["prior"]
    a, b = sorted((shapes_data / "test").glob("*.png"))[:2]
    row = handlers.interpolate(served, image_a=str(a), image_b=str(b), frames=4, **FAST)
    assert len(row.images) == 4 and row.records[0]["images"] == [a.name, b.name]
    with pytest.raises(RequestError, match="`second image`: upload an image"):
        handlers.interpolate(served, image_a=str(a), **FAST)
    with pytest.raises(RequestError, match="`frames` must be a whole number from 2 to 16, got 1"):
        handlers.interpolate(served, "a red circle", "a blue square", frames=1, **FAST)


def test_search_by_text_and_by_image(served, shapes_data):
    found = handlers.search(served, "a red circle", top_k=5)
    assert len(found) == 5 and [f.rank for f in found] == [1, 2, 3, 4, 5]
    assert all(Path(f.path).is_file() for f in found)
    assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)
    query = sorted((shapes_data / "test").glob("*.png"))[4]
    first = handlers.search(served, image_path=str(query), top_k=3)[0]
    assert Path(first.path).name == query.name and first.score == pytest.approx(1.0, abs=1e-2)
    assert first.label.startswith("#1  ") and query.name in first.label
    with pytest.raises(RequestError, match="`query` is empty"):
        handlers.search(served, "  ")
    with pytest.raises(RequestError, match="`top-k` must be a whole number from 1 to 50, got 0"):
        handlers.search(served, "a red circle", top_k=0)


def test_caption_answers_and_refuses_bad_input(served, shapes_data, broken_file):
    image = str(sorted((shapes_data / "test").glob("*.png"))[0])
    pil = Image.open(image).convert("RGB")
    greedy = served.captioner.generate([pil], None, max_new_tokens=8)[0]
    assert handlers.caption(served, image, max_new_tokens=8) == greedy  # what `clipcond caption` writes
    question = "what shape is it?"
    answer = served.captioner.generate([pil], question, max_new_tokens=4)[0]
    assert handlers.caption(served, image, f" {question} ", max_new_tokens=4) == answer  # what `clipcond ask` writes
    with pytest.raises(RequestError, match="`max new tokens` 32 runs past the language model's 64 positions"):
        handlers.caption(served, image, question, max_new_tokens=32)
    with pytest.raises(RequestError, match="`temperature` must be > 0, got 0"):
        handlers.caption(served, image, do_sample=True, temperature=0)
    with pytest.raises(RequestError, match="'broken.png' cannot be read as an image"):
        handlers.caption(served, str(broken_file))


def test_compare_draws_one_seed_across_settings(served):
    grid, records = handlers.compare(
        served, STABLE_DIFFUSION, "a red circle", seed=2, guidance_scales="1; 4", schedulers=["saved", "ddim"], **FAST
    )
    assert [(r["scheduler"], r["guidance_scale"], r["seed"]) for r in records] == [
        ("ddpm", 1.0, 2),
        ("ddpm", 4.0, 2),
        ("ddim", 1.0, 2),
        ("ddim", 4.0, 2),
    ]
    one = handlers.compare(served, STABLE_DIFFUSION, "a red circle", seed=2, guidance_scales="1", **FAST)[0]
    assert grid.width > one.width and grid.height > one.height  # 2 x 2 tiles against 1
    with pytest.raises(RequestError, match="`guidance scales` must be numbers separated by commas"):
        handlers.compare(served, STABLE_DIFFUSION, "a red circle", guidance_scales="1, lots", **FAST)
    with pytest.raises(RequestError, match="the limit is 24"):
        handlers.compare(served, STABLE_DIFFUSION, "a red circle", guidance_scales=",".join(["1"] * 25), **FAST)


def test_run_panel_names_each_run_and_its_lineage(served, tiny_clip_run):
    panel = handlers.run_panel(served)
    for part in ("text_to_image", "image_decoder", "prior", "captioner"):
        assert f"| {part} | `{served.paths.items_dict()[part]}`" in panel
    assert content_hash(tiny_clip_run)[:12] in panel  # the CLIP the decoders were trained on
    assert f"{len(served.index)} images" in panel


def test_flags_that_cannot_be_served_are_refused(pipeline_run, unclip_runs, tmp_path):
    with pytest.raises(ValueError, match="is a second TextToImagePipeline"):
        paths_from_flags([str(pipeline_run), str(pipeline_run)])
    with pytest.raises(ValueError, match="`--prior` .* needs an image-embedding decoder"):
        paths_from_flags([str(pipeline_run)], prior=unclip_runs["prior"])
    with pytest.raises(FileNotFoundError, match="`--index` '.*nowhere' does not exist"):
        paths_from_flags([str(pipeline_run)], index=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nothing to serve"):
        paths_from_flags([])
