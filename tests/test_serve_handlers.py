"""`clipcond serve`'s request handlers (`clipcond.app.handlers`) on tiny saved runs, without a browser: what each tab
draws matches the commands (images and records), and bad input is refused with a message naming the field."""

import json
import math
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcond import cli
from clipcond.app import handlers, panel
from clipcond.app.checks import MAX_UPLOAD_BYTES, RequestError
from clipcond.app.handlers import DALLE2, STABLE_DIFFUSION
from clipcond.app.runs import RunPaths, ServedRuns, paths_from_flags
from clipcond.lineage import content_hash
from clipcond.models.captioner import CAPTION_BEST_OF

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

FAST = {"steps": 2}


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


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming `width` x `height` (8-bit RGB), with no pixel data after it."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def sample_files(shapes_data, n=2) -> list[str]:
    return [str(p) for p in sorted((shapes_data / "test").glob("*.png"))[:n]]


def run_cli(*argv) -> None:
    assert cli.main([*map(str, argv), "--num-inference-steps", "2", "--device", "cpu"]) == 0


def test_tabs_follow_the_runs_served(served):
    assert served.tabs == ["Generate", "Vary", "Search", "Caption", "Compare"]
    assert handlers.text_paths(served) == [STABLE_DIFFUSION, DALLE2]
    only_search = ServedRuns(RunPaths(index=served.paths.index), output_dir=served.output_dir, device="cpu")
    assert only_search.tabs == ["Search"]


@pytest.mark.parametrize(
    ("path", "scheduler"), [(STABLE_DIFFUSION, None), (STABLE_DIFFUSION, "dpm"), (DALLE2, None), (DALLE2, "dpm")]
)
def test_generate_draws_what_clipcond_generate_draws(served, path, scheduler, pipeline_run, unclip_runs, tmp_path):
    progress = []
    drawn = handlers.generate(
        served,
        path=path,
        prompt="  a red circle ",
        seed=3,
        num_images=2,
        scheduler=scheduler,
        progress=lambda *a: progress.append(a),
        **FAST,
    )
    model = pipeline_run if path == STABLE_DIFFUSION else unclip_runs["decoder"]
    argv = ["generate", "--model", model, "--prompt", "a red circle", "--seed", 3, "--num-images", 2]
    argv += ["--output-dir", tmp_path, *(["--scheduler", scheduler] if scheduler else [])]
    run_cli(*argv, *(["--prior", unclip_runs["prior"]] if path == DALLE2 else []))

    assert drawn.records == read_records(tmp_path) == read_records(drawn.folder)
    assert [r["seed"] for r in drawn.records] == [3, 4] and progress == [(2, 2)]
    assert ("prior" in drawn.records[0]) == (path == DALLE2)
    for record, image in zip(drawn.records, drawn.images):
        np.testing.assert_array_equal(pixels(tmp_path / record["file_name"]), np.asarray(image))
    assert all(f.is_file() for f in drawn.files) and [f.name for f in drawn.files[-2:]] == ["images.jsonl", "grid.png"]


def test_each_request_writes_a_folder_of_its_own(served):
    first = handlers.generate(served, path=STABLE_DIFFUSION, prompt="a red circle", num_images=1, **FAST)
    second = handlers.generate(served, path=STABLE_DIFFUSION, prompt="a red circle", num_images=1, **FAST)
    assert first.folder != second.folder and first.folder.parent == second.folder.parent == served.output_dir


def test_a_failed_request_leaves_no_folder(served, shapes_data, monkeypatch):
    """The page lists the output folder: a request that fails after it wrote its first image (or copied its first
    hit) takes its folder with it, and the error reaches the page."""
    before = set(served.output_dir.iterdir())
    written_at_failure = []

    def new_images():
        return [p for folder in set(served.output_dir.iterdir()) - before for p in folder.glob("*.png")]

    def first_image_only(real):
        def batches(pipe, inputs, args, progress=None):
            for images, records in real(pipe, inputs, args):
                for image, record in zip(images, records, strict=True):
                    if new_images():  # one image is written: the next one fails
                        written_at_failure.append(len(new_images()))
                        raise RuntimeError("the device ran out of memory")
                    yield [image], [record]

        return batches

    monkeypatch.setattr(handlers, "generate_batches", first_image_only(handlers.generate_batches))
    monkeypatch.setattr(handlers, "vary_batches", first_image_only(handlers.vary_batches))
    with pytest.raises(RuntimeError, match="ran out of memory"):
        handlers.generate(served, path=STABLE_DIFFUSION, prompt="a red circle", num_images=2, **FAST)
    with pytest.raises(RuntimeError, match="ran out of memory"):
        handlers.compare(served, path=STABLE_DIFFUSION, prompt="a red circle", guidance_scales="1, 2", **FAST)
    with pytest.raises(RuntimeError, match="ran out of memory"):
        handlers.vary(served, image=sample_files(shapes_data, 1)[0], num_images=2, **FAST)
    assert written_at_failure == [1, 1, 1]

    def copy_once_then_fail(source, target):
        if any(Path(target).parent.iterdir()):
            raise OSError(28, "No space left on device")
        real_copy(source, target)

    real_copy = handlers.shutil.copyfile
    monkeypatch.setattr(handlers.shutil, "copyfile", copy_once_then_fail)
    with pytest.raises(OSError, match="No space left"):
        handlers.search(served, text="a red circle", top_k=3)
    assert set(served.output_dir.iterdir()) == before
    monkeypatch.undo()
    drawn = handlers.generate(served, path=STABLE_DIFFUSION, prompt="a red circle", num_images=1, **FAST)
    assert set(served.output_dir.iterdir()) == before | {drawn.folder}


def test_a_scheduler_lasts_one_request(served, shapes_data):
    source = sample_files(shapes_data, 1)[0]
    pipes = (served.text_to_image, served.unclip, served.variation)
    saved = [pipe.scheduler for pipe in pipes]
    for path in (STABLE_DIFFUSION, DALLE2):
        drawn = handlers.generate(served, path=path, prompt="a red circle", num_images=1, scheduler="ddim", **FAST)
        assert drawn.records[0]["scheduler"] == "ddim"
    drawn = handlers.vary(served, image=source, num_images=1, scheduler="euler", **FAST)
    assert drawn.records[0]["scheduler"] == "euler"
    row = handlers.interpolate(served, images=(source, source), frames=2, scheduler="unipc", **FAST)
    assert row.records[0]["scheduler"] == "unipc"
    row = handlers.interpolate(served, prompts=("a", "b"), frames=2, scheduler="euler-a", **FAST)
    assert row.records[0]["scheduler"] == "euler-a"
    assert [pipe.scheduler for pipe in pipes] == saved  # the very objects


def test_requests_from_two_threads_run_one_at_a_time(served):
    """Gradio runs event functions in worker threads: two requests with different schedulers at once must each draw
    with their own and leave the saved one behind."""
    saved, results, errors = served.text_to_image.scheduler, {}, []

    def request(name):
        try:
            drawn = handlers.generate(served, path=STABLE_DIFFUSION, prompt="a red circle", num_images=2,
                                      scheduler=name, **FAST)  # fmt: skip
            results[name] = [r["scheduler"] for r in drawn.records]
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=request, args=(name,)) for name in ("ddim", "euler", "unipc")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {name: [name, name] for name in ("ddim", "euler", "unipc")}
    assert served.text_to_image.scheduler is saved


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"prompt": "   "}, "`prompt` is empty"),
        ({"prompt": None}, "`prompt` is empty"),
        ({"steps": 0}, "`steps` must be a whole number from 1 to 250, got 0"),
        ({"steps": 1000}, "`steps` must be a whole number from 1 to 250, got 1000"),
        ({"steps": 2.5}, "`steps` must be a whole number"),
        ({"steps": None}, "`steps` must be a whole number"),
        ({"num_images": 17}, "`images` must be a whole number from 1 to 16, got 17"),
        ({"seed": -1}, "`seed` must be a whole number"),
        ({"guidance_scale": math.nan}, "`guidance scale` must be a number from 0 to 50, got nan"),
        ({"scheduler": "bogus"}, "'unipc', 'saved'], got 'bogus'"),
        ({"path": "the moon"}, "`path` 'the moon' is not served here"),
    ],
)
def test_generate_refuses_bad_input_by_name(served, values, message):
    request = {"path": STABLE_DIFFUSION, "prompt": "a red circle", "num_images": 1, **FAST, **values}
    with pytest.raises(RequestError) as err:
        handlers.generate(served, **request)
    assert message in str(err.value)


def test_vary_draws_what_clipcond_vary_draws(served, unclip_runs, shapes_data, tmp_path):
    source = Path(sample_files(shapes_data, 1)[0])
    drawn = handlers.vary(served, image=str(source), seed=1, num_images=2, scheduler="dpm", **FAST)
    argv = ["vary", source, "--model", unclip_runs["decoder"], "--seed", 1, "--num-images", 2, "--scheduler", "dpm"]
    run_cli(*argv, "--output-dir", tmp_path)

    expected = read_records(tmp_path)
    assert [{**r, "source": None} for r in drawn.records] == [{**r, "source": None} for r in expected]
    assert drawn.records[0]["source"] == source.name  # an upload's own name, not its temporary path
    assert len(drawn.images) == 2 and drawn.source.size == drawn.images[0].size  # the source, beside
    for record, image in zip(expected, drawn.images):
        np.testing.assert_array_equal(pixels(tmp_path / record["file_name"]), np.asarray(image))


def test_interpolate_draws_what_clipcond_interpolate_draws(served, unclip_runs, shapes_data, tmp_path):
    a, b = sample_files(shapes_data)
    for ends, flag, values in (
        (("a red circle", "a blue square"), "--prompts", {"prompts": ("a red circle", "a blue square")}),
        ((a, b), "--images", {"images": (a, b)}),
    ):
        row = handlers.interpolate(served, frames=3, seed=5, **values, **FAST)
        out = tmp_path / flag.strip("-")
        argv = ["interpolate", "--model", unclip_runs["decoder"], flag, *ends, "--steps", 3, "--seed", 5]
        run_cli(*argv, "--prior", unclip_runs["prior"], "--output-dir", out)
        expected = read_records(out)
        if flag == "--images":  # the page names files by their names
            expected = [{**r, "images": [Path(a).name, Path(b).name]} for r in expected]
        assert row.records == expected and [r["t"] for r in row.records] == [0.0, 0.5, 1.0]
        for record, image in zip(expected, row.images):
            np.testing.assert_array_equal(pixels(out / record["file_name"]), np.asarray(image))
    with pytest.raises(RequestError, match="`second image`: upload an image"):
        handlers.interpolate(served, images=(a, None), **FAST)
    with pytest.raises(RequestError, match="`frames` must be a whole number from 2 to 16, got 1"):
        handlers.interpolate(served, prompts=("a red circle", "a blue square"), frames=1, **FAST)
    with pytest.raises(RequestError, match="`second prompt` is empty"):
        handlers.interpolate(served, prompts=("a red circle", " "), **FAST)


def test_uploads_that_are_not_images_are_refused_by_name(served, broken_file, shapes_data, tmp_path):
    with pytest.raises(RequestError, match=r"`image` 'broken.png' cannot be read as an image"):
        handlers.vary(served, image=str(broken_file), **FAST)
    with pytest.raises(RequestError, match=r"`image`: upload an image"):
        handlers.vary(served, image=None, **FAST)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 4000)).save(huge)
    with pytest.raises(RequestError, match=r"'huge.png' is 5000x4000 pixels; the limit is"):
        handlers.vary(served, image=str(huge), **FAST)
    bomb = tmp_path / "bomb.png"  # a header claiming 10^10 pixels: refused before anything is decoded
    bomb.write_bytes(png_header(100_000, 100_000))
    with pytest.raises(RequestError, match=r"'bomb.png' (is 100000x100000 pixels|cannot be read as an image)"):
        handlers.vary(served, image=str(bomb), **FAST)
    heavy = tmp_path / "heavy.png"
    heavy.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(RequestError, match=r"'heavy.png' is 25.0 MiB; the limit is 25 MiB"):
        handlers.vary(served, image=str(heavy), **FAST)
    truncated = tmp_path / "truncated.png"  # a good header, then the data cut short
    truncated.write_bytes(Path(sample_files(shapes_data, 1)[0]).read_bytes()[:60])
    with pytest.raises(RequestError) as err:
        handlers.vary(served, image=str(truncated), **FAST)
    assert "`image` 'truncated.png' cannot be read as an image" in str(err.value)
    assert str(tmp_path) not in str(err.value)  # the server's path stays on the server


def test_search_by_text_or_by_image(served, shapes_data):
    found = handlers.search(served, text="a red circle", top_k=5)
    assert len(found) == 5 and [f.rank for f in found] == [1, 2, 3, 4, 5]
    assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)
    # the page sends copies of the hits from a request folder of their own, not the indexed files
    (folder,) = {Path(f.path).parent for f in found}
    assert folder.parent == served.output_dir and folder.name.endswith("-search")
    for f in found:
        assert (
            Path(f.path).read_bytes() == Path(f.source).read_bytes() and Path(f.source).parent == shapes_data / "test"
        )
    query = sample_files(shapes_data, 5)[4]
    first = handlers.search(served, image=query, top_k=3)[0]
    assert Path(first.source).name == Path(query).name and first.score == pytest.approx(1.0, abs=1e-2)
    assert first.label.startswith("#1  ") and Path(query).name in first.label
    with pytest.raises(RequestError, match="`query` is empty"):
        handlers.search(served, text="  ")
    with pytest.raises(RequestError, match="`top-k` must be a whole number from 1 to 50, got 0"):
        handlers.search(served, text="a red circle", top_k=0)
    with pytest.raises(RequestError, match="give a text query or an image, not both"):
        handlers.search(served, text="a red circle", image=query)


def test_caption_answers_and_refuses_bad_input(served, shapes_data, broken_file):
    image = sample_files(shapes_data, 1)[0]
    pil = Image.open(image).convert("RGB")
    generator = torch.Generator().manual_seed(0)
    best = served.captioner.generate_best_of([pil], best_of=CAPTION_BEST_OF, max_new_tokens=8, generator=generator)
    assert handlers.caption(served, image=image, max_new_tokens=8) == best[0]  # what `clipcond caption` writes
    question = "what shape is it?"
    answer = served.captioner.generate([pil], question, max_new_tokens=4)[0]
    assert handlers.caption(served, image=image, question=f" {question} ", max_new_tokens=4) == answer  # `ask`
    with pytest.raises(RequestError, match="`max new tokens` 32 runs past the language model's 64 positions"):
        handlers.caption(served, image=image, question=question, max_new_tokens=32)
    with pytest.raises(RequestError, match="`temperature` must be > 0, got 0"):
        handlers.caption(served, image=image, do_sample=True, temperature=0)
    with pytest.raises(RequestError, match="`temperature` must be > 0, got 0"):  # the candidates are sampled at it
        handlers.caption(served, image=image, temperature=0)
    assert handlers.caption(served, image=image, question=question, temperature=0, max_new_tokens=4) == answer
    # an emptied temperature field: no matter to greedy decoding
    assert handlers.caption(served, image=image, question=question, temperature=None, max_new_tokens=4) == answer
    with pytest.raises(RequestError, match="'broken.png' cannot be read as an image"):
        handlers.caption(served, image=str(broken_file))


def test_compare_draws_one_seed_across_settings_in_one_folder(served, pipeline_run, tmp_path):
    drawn = handlers.compare(served, path=STABLE_DIFFUSION, prompt="a red circle", seed=2, guidance_scales="1; 4",
                             schedulers=["saved", "ddim"], **FAST)  # fmt: skip
    assert [(r["scheduler"], r["guidance_scale"], r["seed"]) for r in drawn.records] == [
        ("ddpm", 1.0, 2), ("ddpm", 4.0, 2), ("ddim", 1.0, 2), ("ddim", 4.0, 2)
    ]  # fmt: skip
    assert [r["file_name"] for r in drawn.records] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert read_records(drawn.folder) == drawn.records and all(f.is_file() for f in drawn.files)
    assert drawn.labels[3] == "ddim, guidance 4"
    argv = ["generate", "--model", pipeline_run, "--prompt", "a red circle", "--seed", 2, "--num-images", 1]
    run_cli(*argv, "--scheduler", "ddim", "--guidance-scale", 4, "--output-dir", tmp_path)
    assert read_records(tmp_path)[0] == {**drawn.records[3], "file_name": "00000.png"}
    np.testing.assert_array_equal(pixels(tmp_path / "00000.png"), np.asarray(drawn.images[3]))
    grid = Image.open(drawn.grid)
    one = Image.open(handlers.compare(served, path=STABLE_DIFFUSION, prompt="a red circle", seed=2,
                                      guidance_scales="1", **FAST).grid)  # fmt: skip
    assert grid.width > one.width and grid.height > one.height  # 2 x 2 tiles against 1
    with pytest.raises(RequestError, match="`guidance scales` must be numbers separated by commas"):
        handlers.compare(served, path=STABLE_DIFFUSION, prompt="a red circle", guidance_scales="1, lots", **FAST)
    with pytest.raises(RequestError, match="the limit is 24"):
        handlers.compare(served, path=STABLE_DIFFUSION, prompt="x", guidance_scales=",".join(["1"] * 25), **FAST)


def test_run_panel_names_each_run_and_its_lineage(served, tiny_clip_run):
    text = panel.run_panel(served)
    for part in ("text_to_image", "image_decoder", "prior", "captioner"):
        assert f"| {part} | `{getattr(served.paths, part)}`" in text
    assert content_hash(tiny_clip_run)[:12] in text  # the CLIP the decoders were trained on
    assert f"{len(served.index)} images" in text


def test_flags_that_cannot_be_served_are_refused(pipeline_run, unclip_runs, tmp_path):
    with pytest.raises(ValueError, match="is a second TextToImagePipeline"):
        paths_from_flags([str(pipeline_run), str(pipeline_run)])
    with pytest.raises(ValueError, match="`--prior` .* needs an image-embedding decoder"):
        paths_from_flags([str(pipeline_run)], prior=unclip_runs["prior"])
    with pytest.raises(FileNotFoundError, match="`--index` '.*nowhere' does not exist"):
        paths_from_flags([str(pipeline_run)], index=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nothing to serve"):
        paths_from_flags([])
    with pytest.raises(ValueError, match=r"`--clip` '.*' is the CLIP of an index that moved: pass it with `--index"):
        paths_from_flags([str(pipeline_run)], clip=pipeline_run)


def test_an_output_folder_among_the_runs_is_refused(pipeline_run):
    paths = paths_from_flags([str(pipeline_run)])
    for folder in (pipeline_run, pipeline_run / "unet", pipeline_run.parent):
        with pytest.raises(ValueError, match="`--output-dir` .* is, holds or lies in the text_to_image folder"):
            ServedRuns(paths, output_dir=folder, device="cpu")


def test_an_output_folder_holding_other_files_is_refused(pipeline_run, tmp_path):
    """The page sends every file of its output folder: one that holds a user's files (a home folder) is refused; one
    that holds only an earlier server's request folders is reused."""
    paths = paths_from_flags([str(pipeline_run)])
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "id_rsa").write_text("secret")
    with pytest.raises(ValueError, match=r"`--output-dir` '.*home' holds '.ssh', which is not a request folder"):
        ServedRuns(paths, output_dir=tmp_path / "home", device="cpu")
    (tmp_path / "file" / "00000-generate").parent.mkdir()
    (tmp_path / "file" / "00000-generate").write_text("not a folder")
    with pytest.raises(ValueError, match=r"holds '00000-generate', which is not a request folder"):
        ServedRuns(paths, output_dir=tmp_path / "file", device="cpu")
    (tmp_path / "earlier" / "00000-generate").mkdir(parents=True)
    (tmp_path / "earlier" / "100000-search").mkdir()  # past 99999 the number takes a sixth digit
    runs = ServedRuns(paths, output_dir=tmp_path / "earlier", device="cpu")
    assert runs.request_folder("generate").name == "00001-generate"


def test_the_page_sends_copies_of_the_hits_not_the_index_folder(tiny_clip_run, shapes_data, tmp_path):
    from clipcond import serve
    from clipcond.index import ImageIndex

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sample_files(shapes_data, 3):
        (photos / Path(path).name).write_bytes(Path(path).read_bytes())
    (photos / "notes.html").write_text("<script>private</script>")
    assert cli.main(["index", str(photos), "--model", str(tiny_clip_run), "--output", str(tmp_path / "idx")]) == 0
    runs = ServedRuns(RunPaths(index=tmp_path / "idx"), output_dir=tmp_path / "out", device="cpu")
    assert serve.allowed_paths(runs) == [str(tmp_path / "out")]  # the hits are copied there (see the search test)
    found = handlers.search(runs, text="a red circle", top_k=3)
    assert sorted(Path(f.source).name for f in found) == sorted(Path(p).name for p in sample_files(shapes_data, 3))
    assert all(Path(f.path).is_relative_to(tmp_path / "out") for f in found)

    # an index whose images are all gone serves no image, and the page still builds
    ImageIndex.empty(photos, runs.clip_run).save(tmp_path / "empty")
    empty = ServedRuns(RunPaths(index=tmp_path / "empty"), output_dir=tmp_path / "out", device="cpu")
    assert len(empty.index) == 0 and serve.allowed_paths(empty) == [str(tmp_path / "out")]
