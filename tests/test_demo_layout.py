"""`find_notebook_demo`: which finished `clipcond demo` folder the notebooks show instead of training."""

from clipcond.demo_layout import NOTEBOOK_DEMO_FOLDER, DemoLayout, find_notebook_demo
from clipcond.runs import RUN_RECORD


def make_demo(folder, finished=True, runs=("clip", "decoder")):
    """A demo folder as far as the notebooks look: run records of `runs` and, when `finished`, the report."""
    layout = DemoLayout(folder)
    for name in runs:
        getattr(layout, name).mkdir(parents=True)
        (getattr(layout, name) / RUN_RECORD).write_text("{}")
    if finished:
        layout.report_json.write_text("{}")
    return layout


def test_found_through_the_working_folder_variable(tmp_path):
    make_demo(tmp_path / "somewhere")
    demo = find_notebook_demo(str(tmp_path / "somewhere"), cwd=tmp_path / "elsewhere")
    assert demo is not None and demo.root == tmp_path / "somewhere"
    assert set(demo.finished_runs()) == {"clip", "decoder"}


def test_found_beside_the_notebook(tmp_path):
    make_demo(tmp_path / NOTEBOOK_DEMO_FOLDER, runs=("clip", "decoder", "prior", "unclip_decoder"))
    for unset in (None, ""):
        demo = find_notebook_demo(unset, cwd=tmp_path)
        assert demo is not None and demo.root == tmp_path / NOTEBOOK_DEMO_FOLDER
        assert set(demo.finished_runs()) == {"clip", "decoder", "prior", "unclip_decoder"}


def test_an_unfinished_demo_is_not_shown(tmp_path):
    make_demo(tmp_path / "running", finished=False)
    make_demo(tmp_path / NOTEBOOK_DEMO_FOLDER, finished=False)
    assert find_notebook_demo(str(tmp_path / "running"), cwd=tmp_path) is None
    assert find_notebook_demo(None, cwd=tmp_path) is None
    assert find_notebook_demo(None, cwd=tmp_path / "nothing-here") is None


def test_a_working_folder_of_notebook_runs_keeps_training(tmp_path):
    """The variable names the notebooks' own working folder: they train there, even with a demo beside them."""
    work = tmp_path / "notebook-runs"
    (work / "clip-10").mkdir(parents=True)
    (work / "clip-10" / RUN_RECORD).write_text("{}")
    make_demo(tmp_path / NOTEBOOK_DEMO_FOLDER)
    assert find_notebook_demo(str(work), cwd=tmp_path) is None
    assert find_notebook_demo(str(tmp_path / "not-made-yet"), cwd=tmp_path) is None
    assert not (tmp_path / "not-made-yet").exists()  # looking makes nothing


def test_the_user_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_demo(tmp_path / "my-demo")
    demo = find_notebook_demo("~/my-demo", cwd=tmp_path / "elsewhere")
    assert demo is not None and demo.root == tmp_path / "my-demo"
