"""`clipcond probe` in-process on the session's tiny runs: the report round-trips, errors name the flag."""

import json
import re

import pytest

from clipcond.evaluation.judge import judge_cache_path, save_judge
from clipcond.evaluation.probes import GENERATOR_KINDS, PROBES
from clipcond.probe import main


@pytest.fixture
def judge_cache_dir(judge, tmp_path):
    """The session's judge, cached where the command looks for a judge of the default settings (training one with
    the default budget would take a minute)."""
    folder = tmp_path / "judges"
    save_judge(judge, judge_cache_path(32, cache_dir=folder))
    return folder


def test_probe_round_trips(tiny_clip_run, shapes_data, pipeline_run, judge_cache_dir, tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["--clip", str(tiny_clip_run), "--data", str(shapes_data), "--output-dir", str(out), "--num-pairs", "6"]
    generator = ["--model", str(pipeline_run), "--num-prompts", "1", "--images-per-prompt", "1"]
    generator += ["--num-inference-steps", "2", "--judge-cache-dir", str(judge_cache_dir)]
    assert main([*args, *generator]) == 0
    assert "The plain CLIP recipe: binding" in capsys.readouterr().out

    report = json.loads((out / "probes.json").read_text())
    assert set(report["clip"]) == set(PROBES)
    for figures in report["clip"].values():
        assert figures["all"]["n"] == 12 and figures["seen"]["n"] == figures["heldout"]["n"] == 6
        assert figures["all"]["chance"] == 0.5 and 0.0 <= figures["all"]["accuracy"] <= 1.0
    sd = report["generators"]["stable_diffusion"]
    assert {kind: set(fields) for kind, fields in sd.items()} == {k: set(v) for k, v in GENERATOR_KINDS.items()}
    assert sd["count"]["count"]["all"]["n"] == 2  # one prompt per group, one image each
    assert report["reader"]["accuracy"]["binding"]["binding"]["all"]["accuracy"] == 1.0
    for name in ("probes.md", "examples.png", "generator_stable_diffusion.png", *(f"clip_{p}.png" for p in PROBES)):
        assert (out / name).is_file(), name
    md = (out / "probes.md").read_text()
    assert "| held-out |" in md and "Stable Diffusion path" in md and "reader on renders" in md

    # the same pairs from the data's own images (metadata fields) instead of renders
    meta = tmp_path / "meta"
    assert main([*args[:-3], str(meta), "--num-pairs", "6", "--source", "metadata"]) == 0
    from_metadata = json.loads((meta / "probes.json").read_text())
    assert from_metadata["settings"]["source"] == "metadata" and "binding" in from_metadata["clip"]


def test_probe_names_the_clips_recipe(tiny_clip_run, shapes_data, tmp_path, capsys):
    import shutil

    from clipcond.runs import RunRecord

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_run, clip)
    record = RunRecord.read(clip)
    record.sections["hard_negatives"] = {"kinds": ["swap-attributes", "swap-count"], "share": 0.5}
    record.write(clip)
    out = tmp_path / "probe"
    assert main(["--clip", str(clip), "--data", str(shapes_data), "--output-dir", str(out), "--num-pairs", "2"]) == 0
    verdict = "The CLIP trained with --hard-negatives swap-attributes,swap-count: binding"
    assert verdict in capsys.readouterr().out and verdict in (out / "probes.md").read_text()
    recipe = json.loads((out / "probes.json").read_text())["clip_recipe"]
    assert recipe["hard_negatives"] == ["swap-attributes", "swap-count"] and recipe["counterfactual_pairs"] is None
    # twins alone: named as such, not as the plain recipe
    del record.sections["hard_negatives"]
    record.sections["counterfactual_pairs"] = {"kinds": ["swap-colours"], "share": 0.17}
    record.write(clip)
    argv = [
        "--clip",
        str(clip),
        "--data",
        str(shapes_data),
        "--output-dir",
        str(tmp_path / "twins"),
        "--num-pairs",
        "2",
    ]
    assert main(argv) == 0
    assert "The CLIP trained with --counterfactual-pairs swap-colours: binding" in capsys.readouterr().out
    # weighted twins: the weight named too
    record.sections["counterfactual_pairs"]["weight"] = 8.0
    record.write(clip)
    assert main([*argv[:5], str(tmp_path / "weighted"), *argv[6:]]) == 0
    out = capsys.readouterr().out
    assert "The CLIP trained with --counterfactual-pairs swap-colours --counterfactual-weight 8: binding" in out
    assert json.loads((tmp_path / "weighted" / "probes.json").read_text())["clip_recipe"]["counterfactual_weight"] == 8
    # and the weights per kind, where given
    record.sections["counterfactual_pairs"]["kind_weights"] = {"swap-colours": 16.0}
    record.write(clip)
    assert main([*argv[:5], str(tmp_path / "by_kind"), *argv[6:]]) == 0
    named = (
        "--counterfactual-pairs swap-colours --counterfactual-weight 8 --counterfactual-kind-weights swap-colours=16"
    )
    assert f"The CLIP trained with {named}: binding" in capsys.readouterr().out
    recipe = json.loads((tmp_path / "by_kind" / "probes.json").read_text())["clip_recipe"]
    assert recipe["counterfactual_kind_weights"] == {"swap-colours": 16}


def test_a_probe_report_is_current_only_for_its_clip(tiny_clip_run, shapes_data, tmp_path):
    """What the demo reuses: a report of the same CLIP (content hash), pairs and seed; a CLIP retrained in the same
    folder makes it stale."""
    import shutil

    from clipcond.evaluation.probe_report import current_clip_probes, run_clip_probes, write_report
    from clipcond.runs import RunRecord

    clip, out = tmp_path / "clip", tmp_path / "probe"
    shutil.copytree(tiny_clip_run, clip)
    assert current_clip_probes(out, clip, 2, 0) is None  # nothing written yet
    report, pairs = run_clip_probes(clip, shapes_data, out, 2, 0)
    assert report["settings"]["clip_content_hash"] == RunRecord.read(clip).content_hash
    assert set(pairs) == set(report["clip"]) == set(PROBES)
    write_report(report, out)
    assert current_clip_probes(out, clip, 2, 0)["clip"] == report["clip"]
    assert current_clip_probes(out, clip, 3, 0) is None and current_clip_probes(out, clip, 2, 1) is None
    record = RunRecord.read(clip)
    record.sections["content_hash"] = "0" * 64  # as if the CLIP stage had re-run into the folder
    record.write(clip)
    assert current_clip_probes(out, clip, 2, 0) is None


def test_probe_reads_a_captioners_captions(tiny_clip_run, shapes_data, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    from clipcond.models.captioner import CAPTION_BEST_OF, Captioner
    from clipcond.train.captioner import main as train_captioner

    captioner = tmp_path / "captioner"
    train = ["--clip", str(tiny_clip_run), "--data", str(shapes_data), "--output-dir", str(captioner)]
    train += ["--model", "test", "--max-train-steps", "2", "--checkpointing-steps", "0", "--validation-steps", "0"]
    assert train_captioner(train) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    asked, sizes = [], []
    best_of = Captioner.generate_best_of

    def spy(self, images, *args, **kwargs):
        asked.append((kwargs["best_of"], kwargs["generator"].initial_seed()))
        sizes.append(len(images))
        return best_of(self, images, *args, **kwargs)

    monkeypatch.setattr(Captioner, "generate_best_of", spy)
    args = ["--clip", str(tiny_clip_run), "--data", str(shapes_data), "--num-pairs", "4"]
    args += ["--captioner", str(captioner)]
    greedy = ["--captioner-best-of", "1", "--seed", "1", "--batch-size", "3"]
    runs = (("default", [], CAPTION_BEST_OF, 0, [8]), ("greedy", greedy, 1, 1, [3, 3, 2]))
    for out, extra, candidates, seed, batches in runs:
        asked.clear()
        sizes.clear()
        assert main([*args, "--output-dir", str(tmp_path / out), *extra]) == 0
        # the captions `clipcond caption --best-of N` writes, sampled from a generator of --seed, in --batch-size calls
        assert asked and set(asked) == {(candidates, seed)}
        assert sizes == batches * len(PROBES)
        report = json.loads((tmp_path / out / "probes.json").read_text())
        assert report["settings"]["captioner"] == str(captioner) and set(report["captioner"]) == set(PROBES)
        assert report["settings"]["captioner_best_of"] == candidates
        for figures in report["captioner"].values():
            assert figures["all"]["n"] == 8 and figures["all"]["chance"] == 0.5
        assert (tmp_path / out / "captioner.png").is_file()
    md = (tmp_path / "default" / "probes.md").read_text()
    assert f"captions, each the best of {CAPTION_BEST_OF} candidates" in md
    assert "read back from its greedy captions" in (tmp_path / "greedy" / "probes.md").read_text()


def test_a_report_without_the_candidates_read_greedy_captions():
    """Reports written before `--captioner-best-of` read greedy captions, and say so."""
    from clipcond.evaluation.probe_report import markdown_tables

    figures = {"all": {"accuracy": 0.5, "low": 0.3, "high": 0.7, "chance": 0.5, "n": 8}}
    report = {"settings": {"captioner": "cap"}, "captioner": {"count": figures}}
    assert "fields read back from its greedy captions" in markdown_tables(report)
    report["settings"]["captioner_best_of"] = 3
    assert "fields read back from its captions, each the best of 3 candidates" in markdown_tables(report)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-pairs", "0"], "`--num-pairs` must be >= 1, got 0"),
        (["--captioner-best-of", "0"], "`--captioner-best-of` must be >= 1 (1: greedy decoding), got 0"),
        (["--captioner-best-of", "4"], "`--captioner-best-of` 4 needs `--captioner`"),
        (["--prior", "p"], "`--prior` 'p' needs `--decoder`"),
        (["--model", "/nonexistent/decoder"], "`--model` '/nonexistent/decoder' does not exist"),
        (["--source", "metadata", "--split", "nope"], "`--split` 'nope'"),
    ],
)
def test_errors_name_the_flag(tiny_clip_run, shapes_data, tmp_path, extra, message):
    args = ["--clip", str(tiny_clip_run), "--data", str(shapes_data), "--output-dir", str(tmp_path / "o"), *extra]
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        main(args)


def test_probe_refuses_other_data(tiny_clip_run, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="`--data` .* is not the built-in shapes data"):
        main(["--clip", str(tiny_clip_run), "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o")])
