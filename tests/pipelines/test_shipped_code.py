"""Pipeline folders that ship their code (`clipcond.pipeline_code`): stock diffusers, in a process where clipcond cannot
be imported, loads a text-to-image decoder, an image-embedding decoder and a prior with
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` and draws what clipcond's own loading draws; the
shipped modules are clipcond's, with their imports made relative and nothing else changed."""

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from test_text_to_image import make_pipeline, tokenizer  # noqa: F401 (tokenizer: a fixture)
from test_variation import make_decoder
from without_clipcond import assert_stock_diffusers_draws_the_same

from clipcond import export_diffusers
from clipcond.models.clip import load_text_tower, load_vision_tower
from clipcond.models.image_embedding import ImageEmbeddingTokens
from clipcond.models.prior import create_prior, embedding_statistics, prior_config, set_embedding_statistics
from clipcond.pipeline_code import code_closure, flat_name, ship_pipeline_code
from clipcond.pipeline_loading import pipeline_class_name
from clipcond.pipelines import ImageVariationPipeline, PriorPipeline, TextToImagePipeline

PROMPTS = ["a red circle", "a blue square"]


def _prior_pipeline(clip_run) -> PriorPipeline:
    text_encoder, clip_tokenizer = load_text_tower(clip_run)
    width, context = text_encoder.config.projection_dim, text_encoder.config.max_position_embeddings
    torch.manual_seed(0)
    prior = create_prior(prior_config("test", embedding_dim=width, num_embeddings=context))
    embeds = F.normalize(torch.randn(64, width) + torch.linspace(-1, 1, width), dim=-1)
    set_embedding_statistics(prior, *embedding_statistics(embeds))  # post-processing is then not the identity
    scheduler = DDPMScheduler(prediction_type="sample", clip_sample_range=5.0, timestep_spacing="trailing")
    return PriorPipeline(prior=prior.eval(), scheduler=scheduler, text_encoder=text_encoder, tokenizer=clip_tokenizer)


def _shipped(pipe, folder: Path) -> Path:
    """`pipe` saved as a run folder is: `save_pretrained`, then its code (`DiffusionStage.export`)."""
    pipe.save_pretrained(folder)
    ship_pipeline_code(pipe, folder)
    return folder


def _shipped_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py"))


def test_a_text_decoder_folder_loads_and_draws_the_same_without_clipcond(tokenizer, tmp_path):  # noqa: F811
    run = _shipped(make_pipeline(tokenizer, scheduler=DDIMScheduler(timestep_spacing="trailing")), tmp_path / "run")
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_text_to_image", "TextToImagePipeline"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]  # the stock components keep their entries
    assert pipeline_class_name(run) == "TextToImagePipeline"
    call = {"prompt": PROMPTS, "num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "np", "seed": 0}
    assert_stock_diffusers_draws_the_same(run, TextToImagePipeline, tmp_path, **call)


def test_an_image_embedding_decoder_folder_loads_and_draws_the_same_without_clipcond(tiny_clip_run, tmp_path):
    encoder, _, _ = load_vision_tower(tiny_clip_run)
    run = _shipped(make_decoder(encoder, scheduler=DDIMScheduler(timestep_spacing="trailing")), tmp_path / "run")
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_variation", "ImageVariationPipeline"]
    # the clipcond component in diffusers' layout for custom components: its module in its own folder
    assert index["embedding_tokens"] == ["modeling_embedding_tokens", "ImageEmbeddingTokens"]
    assert (run / "embedding_tokens" / "image_embedding.py").is_file()
    # and where clipcond finds it, out of diffusers' sight (it leaves out keys that start with `_`)
    assert index["_clipcond_components"] == {
        "embedding_tokens": ["clipcond.models.image_embedding", "ImageEmbeddingTokens"]
    }
    assert pipeline_class_name(run) == "ImageVariationPipeline"

    loaded = ImageVariationPipeline.from_pretrained(run, local_files_only=True)
    assert type(loaded.embedding_tokens) is ImageEmbeddingTokens  # clipcond's class, not the folder's copy
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    call = {"image": images, "num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "np", "seed": 0}
    assert_stock_diffusers_draws_the_same(run, ImageVariationPipeline, tmp_path, **call)


def test_a_prior_folder_loads_and_samples_the_same_without_clipcond(tiny_clip_run, tmp_path):
    run = _shipped(_prior_pipeline(tiny_clip_run), tmp_path / "run")
    assert json.loads((run / "model_index.json").read_text())["_class_name"] == ["pipeline_prior", "PriorPipeline"]
    call = {"prompt": PROMPTS, "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "pt", "seed": 0}
    assert_stock_diffusers_draws_the_same(run, PriorPipeline, tmp_path, **call)


def _imports_of_clipcond(path: Path) -> list[int]:
    """The lines of `path` that import clipcond (at any depth, relative imports excepted)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        else:
            continue
        if any(module.split(".")[0] == "clipcond" for module in modules):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("kind", ["text", "image-embedding", "prior"])
def test_shipped_modules_are_clipconds_with_relative_imports(kind, tokenizer, tiny_clip_run, tmp_path):  # noqa: F811
    """No shipped module imports clipcond; each is its source file, line for line, but for the imports of clipcond
    modules (now relative) and a first line that says so."""
    if kind == "text":
        pipe = make_pipeline(tokenizer)
    elif kind == "image-embedding":
        pipe = make_decoder(load_vision_tower(tiny_clip_run)[0])
    else:
        pipe = _prior_pipeline(tiny_clip_run)
    run = _shipped(pipe, tmp_path / "run")
    closure = code_closure(type(pipe).__module__)
    # the pipeline's modules, and no command, training or cache module among them
    assert all(m.startswith(("clipcond.pipelines.", "clipcond.models.")) or m.count(".") == 1 for m in closure)
    assert not {"clipcond.conditioning", "clipcond.runs", "clipcond.hub"} & set(closure)
    for path in _shipped_files(run):
        assert _imports_of_clipcond(path) == [], path
    sources = {flat_name(m): Path(__import__(m, fromlist=["_"]).__file__) for m in closure}
    for name, source in sources.items():
        shipped = (run / f"{name}.py").read_text().splitlines()
        original = source.read_text().splitlines()
        assert shipped[0].startswith("# Written by clipcond from the module") and len(shipped) == len(original) + 1
        changed = [(a, b) for a, b in zip(original, shipped[1:]) if a != b]
        for line, shipped_line in changed:
            module = line.split()[1]
            assert line.startswith("from clipcond.") and shipped_line == line.replace(module, "." + flat_name(module))


def test_clipcond_loads_folders_written_before_code_shipped(tiny_clip_run, tmp_path):
    """A folder without shipped code (model_index.json naming the class and clipcond's module) still loads."""
    pipe = make_decoder(load_vision_tower(tiny_clip_run)[0])
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ImageVariationPipeline"
    assert index["embedding_tokens"] == ["clipcond.models.image_embedding", "ImageEmbeddingTokens"]
    loaded = ImageVariationPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is ImageVariationPipeline and type(loaded.embedding_tokens) is ImageEmbeddingTokens
    assert pipeline_class_name(tmp_path) == "ImageVariationPipeline"


def test_only_clipcond_pipelines_saved_first_ship(tokenizer, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="holds no model_index.json: save the pipeline there first"):
        ship_pipeline_code(make_pipeline(tokenizer), tmp_path)
    stock = DDPMScheduler()
    with pytest.raises(ValueError, match="`pipeline` must be one of clipcond's pipelines, got diffusers"):
        ship_pipeline_code(stock, tmp_path)


def test_export_diffusers_ships_the_code_of_an_older_run(tokenizer, tmp_path):  # noqa: F811
    """`clipcond export diffusers RUN OUT`: a run folder written before code shipped, saved again with its code."""
    run = tmp_path / "old"
    make_pipeline(tokenizer, scheduler=DDIMScheduler(timestep_spacing="trailing")).save_pretrained(run)
    (run / "clipcond_run.json").write_text(json.dumps({"kind": "clipcond-decoder"}))
    assert export_diffusers.main([str(run), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "clipcond_run.json").read_text()) == {"kind": "clipcond-decoder"}
    assert not list(run.glob("*.py"))  # RUN is left as it was
    call = {"prompt": PROMPTS, "num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "np", "seed": 0}
    assert_stock_diffusers_draws_the_same(out, TextToImagePipeline, tmp_path, **call)

    with pytest.raises(FileExistsError, match="`OUT` .*out' exists; pass a new folder"):
        export_diffusers.main([str(run), str(out)])
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="`RUN` .*other' holds StableDiffusionPipeline; expected one of"):
        export_diffusers.main([str(other), str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()
