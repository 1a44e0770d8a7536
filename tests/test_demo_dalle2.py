"""`clipcond demo --quick --dalle2`: a finished default demo gains the DALL-E 2 stages (prior, image-embedding
decoder, their judged evaluation), the report its "DALL-E 2 path" section and table; a rerun reuses every stage; and
`clipcond eval unclip` on the demo's runs."""

import json

import pytest
import torch

from clipcond.demo import QUICK_JUDGE, default_sample_dtype, main, parse_args
from clipcond.evaluation import judge as judge_module
from clipcond.evaluation import unclip
from clipcond.evaluation.unclip import DEFAULT_DECODER_GUIDANCE_SCALE as DEFAULT_GUIDANCE_SCALE  # the unCLIP decoder's
from clipcond.pipeline_loading import DEFAULT_SAMPLER

# The numpy-2 `__array__` copy DeprecationWarning of diffusers' DPM-Solver, which the samples are drawn with.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
DEFAULT_STAGES = {"startup", "data", "clip", "clip_eval", "probe", "decoder", "samples", "generation_eval"}
DALLE2_STAGES = {"prior", "unclip_decoder", "unclip_eval"}
PATHS = {"stable_diffusion_text_to_image", "dalle2_text_to_image", "dalle2_variations"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A quick default demo, then the same folder with --dalle2: the default stages are reused."""
    out = tmp_path_factory.mktemp("demo_dalle2") / "demo"
    assert main(["--output-dir", str(out), "--quick"]) == 0
    assert main(["--output-dir", str(out), "--quick", "--dalle2"]) == 0
    return out


def test_dalle2_stages_extend_a_finished_demo(demo):
    report = json.loads((demo / "report.json").read_text())
    assert set(report["timings"]) == DEFAULT_STAGES | DALLE2_STAGES
    assert all(report["timings"][name]["reused"] for name in DEFAULT_STAGES)
    assert not any(report["timings"][name]["reused"] for name in DALLE2_STAGES)
    assert report["prior"]["steps"] == 4 and report["prior"]["model"] == "test"
    assert report["unclip_decoder"]["steps"] == 4 and report["unclip_decoder"]["embedding_tokens"] == 4
    assert json.loads((demo / "prior" / "clipcond_run.json").read_text())["kind"] == "clipcond-prior"
    decoder_record = json.loads((demo / "unclip_decoder" / "clipcond_run.json").read_text())
    assert decoder_record["conditioning"] == "image-embedding"

    evaluation = report["unclip_eval"]
    assert set(evaluation) == {"prior", "variations", "text_to_image", "settings"}
    prior = evaluation["prior"]
    # the report's figures are the evaluation's own file's (written last by `clipcond eval unclip`'s code)
    assert evaluation == json.loads((demo / "unclip_eval" / "metrics.json").read_text())
    assert prior["cosine_predicted"] != prior["cosine_text_baseline"] != prior["cosine_random_baseline"]
    assert prior["num_captions"] == 36
    variations = evaluation["variations"]
    assert variations["num_sources"] == 18 and variations["num_images"] == 18  # quick: 1 source x 1 variation
    text_to_image = evaluation["text_to_image"]
    assert text_to_image["num_images"] == 18 and list(text_to_image["guidance"]) == [str(DEFAULT_GUIDANCE_SCALE)]
    assert text_to_image["settings"]["prior_guidance_scale"] == 4.0
    assert (text_to_image["settings"]["guidance_start"], text_to_image["settings"]["guidance_end"]) == (0.4, 1.0)
    assert text_to_image["settings"]["scheduler"] == DEFAULT_SAMPLER
    assert evaluation["settings"]["dtype"] == default_sample_dtype()  # the demo's --sample-dtype

    # the one table: seen / held-out rows, colour and shape of each of the three ways to draw
    table = report["dalle2_table"]
    assert set(table) == {"seen", "heldout"} and all(set(row) == PATHS for row in table.values())
    assert table["seen"]["dalle2_variations"]["colour"] == variations["colour_accuracy_seen"]
    assert table["heldout"]["dalle2_text_to_image"]["shape"] == text_to_image["shape_accuracy_heldout"]
    assert table["seen"]["stable_diffusion_text_to_image"]["colour"] == report["generation"]["colour_accuracy_seen"]

    out = demo / "unclip_eval"
    assert json.loads((out / "metrics.json").read_text()) == evaluation
    assert (out / "prior.json").is_file() and (out / "variations" / "grid.png").is_file()
    assert (out / "text_to_image" / f"grid_guidance_{DEFAULT_GUIDANCE_SCALE}.png").is_file()


def test_report_has_the_dalle2_section(demo):
    md = (demo / "report.md").read_text()
    section = md[md.index("## DALL-E 2 path") : md.index("## Time by stage")]
    assert "text-embedding baseline" in section and "random-image baseline" in section
    header = next(line for line in section.splitlines() if line.startswith("| compositions"))
    assert header.count("|") == 8 and "SD path: colour" in header and "variations: shape" in header
    rows = [line for line in section.splitlines() if line.startswith(("| seen", "| held-out"))]
    assert len(rows) == 2 and all(row.count("%") == 6 for row in rows)
    assert "![variations](unclip_eval/variations/grid.png)" in section
    assert "| unclip_eval |" in md  # its time, in the stage table


def test_rerun_reuses_the_dalle2_stages(demo, capsys):
    stamps = {p: (demo / p).stat().st_mtime_ns for p in ("prior/model_index.json", "unclip_eval/metrics.json")}
    before = json.loads((demo / "report.json").read_text())
    assert main(["--output-dir", str(demo), "--quick", "--dalle2"]) == 0
    assert {p: (demo / p).stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((demo / "report.json").read_text())
    assert all(t["reused"] for t in again["timings"].values()) and again["seconds"] == before["seconds"]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert set(printed["dalle2"]) == {
        "cosine_predicted",
        "cosine_text_baseline",
        "cosine_random_baseline",
        "seen",
        "heldout",
    }


def test_eval_unclip_command_on_the_demo_runs(demo, monkeypatch, capsys):
    # the demo's quick judge (cached in the demo folder), instead of training the command's default one here
    config = judge_module.JudgeTrainingConfig(**QUICK_JUDGE)
    quick_judge = judge_module.load_or_train_judge(32, cache_dir=demo / "judge", config=config)
    monkeypatch.setattr(judge_module, "load_or_train_judge", lambda resolution, **kwargs: quick_judge)
    out = demo / "eval_unclip"
    argv = ["--decoder", str(demo / "unclip_decoder"), "--prior", str(demo / "prior"), "--data", str(demo / "data")]
    argv += ["--output-dir", str(out), "--sources-per-class", "1", "--variations-per-source", "2"]
    argv += ["--images-per-prompt", "1", "--num-inference-steps", "1", "--prior-num-inference-steps", "1"]
    argv += ["--prior-max-captions", "8", "--device", "cpu", "--no-progress"]
    assert unclip.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)  # stdout holds the JSON object and nothing else
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["variations"]["num_images"] == 36 and metrics["prior"]["num_captions"] == 8
    assert metrics["text_to_image"]["settings"]["clip"] == str(demo / "clip")
    assert metrics["settings"]["dtype"] == "fp32"
    with pytest.raises(FileNotFoundError, match="`--prior`"):
        unclip.main([*argv[:2], "--prior", str(demo / "missing"), *argv[4:]])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`--dtype fp16` needs a CUDA device"):
            unclip.main([*argv, "--dtype", "fp16"])


def test_dalle2_options_are_checked():
    assert parse_args(["--dalle2"]).dalle2 and not parse_args([]).dalle2
    with pytest.raises(ValueError, match="`--variation-sources` must be >= 1"):
        parse_args(["--dalle2", "--variation-sources", "0"])
    with pytest.raises(ValueError, match="`--prior-steps` must be >= 1"):
        parse_args(["--dalle2", "--prior-steps", "0"])


def test_unclip_quality_benchmark_reads_a_finished_demo(demo, monkeypatch):
    """`benchmarks/unclip_quality.py` on a finished --dalle2 demo: every stage reused, the figures of the report,
    and the judged image counts the bars over seeds weigh (quick: 14 seen classes, one image or variation each)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import unclip_quality

    result = unclip_quality.run(demo, seed=0, quick=True)
    report = json.loads((demo / "report.json").read_text())
    assert set(result["reused_stages"]) >= DALLE2_STAGES
    assert result["num_judged_seen"] == {"variations": 14, "prior_text_to_image": 14}
    variations = report["unclip_eval"]["variations"]
    assert result["variations"]["shape_accuracy_seen"] == variations["shape_accuracy_seen"]
    summary = unclip_quality.over_seeds({0: result})
    assert summary["variations_shape_accuracy_seen"]["mean"] == variations["shape_accuracy_seen"]


def test_unclip_quality_benchmark_judges_a_finished_demo_again(demo, monkeypatch):
    """`--sources-per-class N`: the figures and image counts are those of the new evaluation (here a stand-in that
    writes the demo's metrics under N sources), and the result keeps the demo's own settings beside them."""
    import shutil
    from pathlib import Path

    import clipcond.evaluation.unclip as unclip_module

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import unclip_quality

    evaluation = json.loads((demo / "report.json").read_text())["unclip_eval"]

    def evaluate(argv):
        args = unclip_module.parse_args(argv)
        metrics = json.loads(json.dumps(evaluation))
        metrics["settings"]["sources_per_class"] = args.sources_per_class
        metrics["variations"]["colour_accuracy_seen"] = 0.5
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics))
        return 0

    monkeypatch.setattr(unclip_module, "main", evaluate)
    stale = demo / "unclip_decoder" / "eval_benchmark" / "grid_guidance_5.0.png"  # an earlier run's, unlike this one's
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()
    result = unclip_quality.run(demo, seed=0, quick=True, sources_per_class=3)
    assert (demo / "unclip_decoder" / "eval_benchmark" / "metrics.json").is_file() and not stale.exists()
    assert result["num_judged_seen"]["variations"] == 14 * 3 and result["variations"]["colour_accuracy_seen"] == 0.5
    assert result["demo_settings"] == evaluation["settings"] and "table" not in result
    shutil.rmtree(demo / "unclip_decoder" / "eval_benchmark")  # the module's demo, as the other tests find it
