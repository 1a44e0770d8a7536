"""`clipcond serve` without a server: its flags, `--demo` on a demo folder, and the page's error messages."""

import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from clipcond import cli, serve
from clipcond.app import handlers, panel

gr = pytest.importorskip("gradio", reason="`clipcond serve` needs the ui extra (gradio)")


@pytest.fixture(scope="module")
def demo(tiny_clip_run, pipeline_run, shapes_data, tmp_path_factory):
    """A demo folder as `clipcond demo` leaves it, with its CLIP, its decoder, its test images and its report."""
    out = tmp_path_factory.mktemp("serve_demo")
    shutil.copytree(tiny_clip_run, out / "clip")
    shutil.copytree(pipeline_run, out / "decoder")
    shutil.copytree(shapes_data / "test", out / "data" / "test")
    (out / "clip" / "eval").mkdir()
    Image.new("RGB", (8, 8)).save(out / "clip" / "eval" / "confusion.png")
    report = "# clipcond demo\n\nthe demo's own report\n\n![confusion matrix](clip/eval/confusion.png)\n"
    (out.parent / "outside.png").write_bytes(b"private")  # beside the demo folder
    unsafe = ["![missing](nowhere.png)", "![escape](../outside.png)", "![weights](decoder/model_index.json)"]
    (out / "report.md").write_text(report + "\n".join(unsafe) + "\n")
    (out / "report.json").write_text("{}")
    return out


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_demo_folder_serves_its_runs_and_an_index_of_its_test_images(demo, tmp_path):
    before = files_under(demo)
    args = serve.parse_args(["--demo", str(demo), "--device", "cpu", "--output-dir", str(tmp_path)])
    page, runs = serve.build(args)

    assert isinstance(page, gr.Blocks)
    assert runs.tabs == ["Generate", "Search", "Compare"]  # no image-embedding decoder, no captioner
    assert len(runs.index) == len(list((demo / "data" / "test").glob("*.png")))
    assert runs.test_images and runs.test_images[0][0].startswith("00000.png: ")  # labelled with its caption
    assert handlers.search(runs, text="a red circle", top_k=3)[0].source.startswith(str(demo / "data" / "test"))
    text = panel.run_panel(runs)
    assert "the demo's own report" in text
    figure = (demo / "clip" / "eval" / "confusion.png").resolve()
    assert f"![confusion matrix](/gradio_api/file={figure})" in text  # the report's figure, where the page serves it
    for link in ("![missing](nowhere.png)", "![escape](../outside.png)", "![weights](decoder/model_index.json)"):
        assert link in text  # no file, outside the demo folder, not an image: left as it is, and not served
    # the output folder (search hits are copied there), and file by file the test images and the report's figure
    test_images = {str(path) for _, path in runs.test_images}
    assert set(serve.allowed_paths(runs)) == {str(tmp_path), *test_images, str(figure)}
    assert f"from the demo folder `{demo}`" in panel.serving_line(runs)
    assert files_under(demo) == before  # nothing written into the demo folder


def test_a_relative_demo_folder_serves_files_by_absolute_path(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(demo.parent)
    _, runs = serve.build(serve.parse_args(["--demo", demo.name, "--device", "cpu", "--output-dir", str(tmp_path)]))
    found = handlers.search(runs, text="a red circle", top_k=3)
    assert all(Path(f.source).is_absolute() and Path(f.path).is_file() for f in found)
    drawn = handlers.generate(runs, path=handlers.STABLE_DIFFUSION, prompt="a red circle", num_images=1, steps=2)
    assert drawn.records[0]["model"] == str(Path(demo.name) / "decoder")  # as `clipcond generate --model` records it


def test_the_output_folder_may_not_be_the_demo_folder(demo, capsys):
    assert cli.main(["serve", "--demo", str(demo), "--output-dir", str(demo / "out")]) != 0
    assert "is, holds or lies in the demo folder" in capsys.readouterr().err


def test_flags_naming_runs_override_the_demos(demo, unclip_runs, tmp_path):
    argv = ["--demo", str(demo), "--model", str(unclip_runs["decoder"]), "--prior", str(unclip_runs["prior"])]
    _, runs = serve.build(serve.parse_args([*argv, "--device", "cpu", "--output-dir", str(tmp_path)]))
    assert runs.tabs == ["Generate", "Vary", "Search", "Compare"]
    assert handlers.text_paths(runs) == [handlers.STABLE_DIFFUSION, handlers.DALLE2]


def test_a_decoder_flag_replaces_the_demos_decoder_and_its_prior(demo, unclip_runs, tmp_path):
    dalle2 = tmp_path / "dalle2_demo"
    shutil.copytree(demo, dalle2)
    shutil.copytree(unclip_runs["decoder"], dalle2 / "unclip_decoder")
    shutil.copytree(unclip_runs["prior"], dalle2 / "prior")
    _, runs = serve.build(
        serve.parse_args(["--demo", str(dalle2), "--device", "cpu", "--output-dir", str(tmp_path / "a")])
    )
    assert runs.paths.prior == dalle2 / "prior" and runs.tabs == ["Generate", "Vary", "Search", "Compare"]
    argv = ["--demo", str(dalle2), "--model", str(unclip_runs["unclip"]), "--device", "cpu"]
    _, runs = serve.build(serve.parse_args([*argv, "--output-dir", str(tmp_path / "b")]))
    assert runs.paths.prior is None  # the demo's prior went with the demo's decoder; the unCLIP folder has its own
    assert runs.paths.image_decoder == unclip_runs["unclip"] and runs.unclip is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to serve"),
        (["--demo", "{tmp}", "--port", "0"], "`--port` must be from 1 to 65535, got 0"),
        (["--demo", "{tmp}"], "holds no finished CLIP run"),
        (["--demo", "{tmp}/missing"], "`--demo` '.*missing' does not exist"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["serve", *argv]) != 0
    err = capsys.readouterr().err
    assert err.startswith("clipcond serve: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_without_gradio_the_command_says_what_to_install(demo, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ValueError, match=r'needs Gradio: pip install "clipcond\[ui\]"'):
        serve.main(["--demo", str(demo)])


def test_the_page_shows_errors_as_messages_not_tracebacks():
    from clipcond.app.page import answered

    @answered
    def refuse():
        raise handlers.RequestError("`steps` must be a whole number from 1 to 250, got 0")

    @answered
    def crash():
        raise RuntimeError("out of memory\nwith details")

    with pytest.raises(gr.Error) as err:
        refuse()
    assert err.value.message == "`steps` must be a whole number from 1 to 250, got 0"
    with pytest.raises(gr.Error) as err:
        crash()
    assert err.value.message.startswith("the request failed (RuntimeError: out of memory")
    assert "Traceback" not in err.value.message


def test_without_output_dir_the_requests_files_go_with_the_server(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    served = []

    def launch(page, **kwargs):  # stands in for the server: one request's file, then the server stops
        (folder,) = (Path(p) for p in kwargs["allowed_paths"] if p.startswith(str(tmp_path / "tmp")))
        (folder / "request" / "grid.png").parent.mkdir()
        (folder / "request" / "grid.png").write_bytes(b"png")
        served.append(folder)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    assert serve.main(["--demo", str(demo), "--device", "cpu"]) == 0
    assert served and served[0].name.startswith("clipcond-serve-")
    assert not served[0].exists() and list((tmp_path / "tmp").iterdir()) == []
