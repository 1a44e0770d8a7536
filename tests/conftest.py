"""Shared test set-up: offline, seeded, and `--runslow` for the long runs."""

import errno
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page tests build Gradio apps: no telemetry calls
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run tiny models, which gain nothing from intra-op threads; on a busy 2-core machine two threads per process
# made them several times slower. Subprocesses (the SIGKILL and multi-process tests) inherit OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # also when set outside: a subprocess must run the threads this process runs


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 2 MB file system (tmpfs) to fill up, where the test may mount one (root on Linux); skipped elsewhere,
    where the disk-full tests that inject the error still run."""
    import subprocess

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=False)  # memory maps may still hold files


@pytest.fixture
def full_disk_at_image(monkeypatch):
    """`fill(name)`: from then on, writing the image file `name` fails as on a full disk (ENOSPC). Images are written
    to a scratch file `.NAME.*` renamed into place when whole (`clipcond.storage.save_image_atomic`); the error
    comes while writing it. `monkeypatch.undo()` frees the disk."""
    from PIL import Image

    original = Image.Image.save

    def fill(name: str) -> None:
        def no_space(self, fp, *args, **kwargs):
            if isinstance(fp, (str, os.PathLike)) and Path(fp).name.startswith(f".{name}."):
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, fp, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", no_space)

    return fill


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A small built-in shapes data set (32 px): 240 train images, 36 test images (2 per colour-shape pair)."""
    from clipcond.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_images=276, num_test_images=36, resolution=32, seed=0)
    return root


TINY_CLIP_ARGS = ["--model", "test", "--train-batch-size", "16", "--lr-warmup-steps", "2", "--seed", "0"]


@pytest.fixture(scope="session")
def tiny_clip_run(shapes_data, tmp_path_factory):
    """A `test`-preset CLIP trained for a few steps on `shapes_data`: a real run folder for later stages."""
    from accelerate.state import AcceleratorState, GradientState

    from clipcond.train.clip import main

    out = tmp_path_factory.mktemp("clip_run")
    args = ["--data", str(shapes_data), "--output-dir", str(out), "--max-train-steps", "4", *TINY_CLIP_ARGS]
    main([*args, "--validation-steps", "0", "--checkpointing-steps", "0"])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


# One attribute judge for every evaluation test: trained once per session into a shared cache folder. A smaller
# budget than the default (7200 renders x 6 epochs): about a third of the steps, still ~100% on clean one-object
# renders and ~95% on the outcome of renders of every kind.
TEST_JUDGE_TRAINING = {"num_renders": 3600, "epochs": 4}


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "judge_cache"


@pytest.fixture(scope="session")
def judge_config():
    from clipcond.evaluation.judge import JudgeTrainingConfig

    return JudgeTrainingConfig(**TEST_JUDGE_TRAINING)


@pytest.fixture(scope="session")
def judge(judge_cache, judge_config):
    from clipcond.evaluation.judge import load_or_train_judge

    return load_or_train_judge(32, cache_dir=judge_cache, config=judge_config)


@pytest.fixture(scope="session")
def pipeline_run(tiny_clip_run, tmp_path_factory):
    """A random `test`-preset UNet on the tiny CLIP's text encoder, saved as the decoder training saves a run."""
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    from clipcond.models.unet import create_unet, unet_config
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    text_encoder = CLIPTextModelWithProjection.from_pretrained(tiny_clip_run, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_run, local_files_only=True)
    torch.manual_seed(0)
    unet = create_unet(unet_config("test", sample_size=32, cross_attention_dim=text_encoder.config.hidden_size))
    pipe = TextToImagePipeline(unet=unet, scheduler=DDPMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("decoder_run")
    pipe.save_pretrained(path)
    (path / "clipcond_run.json").write_text(json.dumps({"clip": {"path": str(tiny_clip_run)}}))
    return path


def _save_run(pipe, folder, clip_run, kind):
    from clipcond.lineage import content_hash

    pipe.save_pretrained(folder)
    record = {"kind": f"clipcond-{kind}", "clip": {"path": str(clip_run), "content_hash": content_hash(clip_run)}}
    (folder / "clipcond_run.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="session")
def unclip_runs(tiny_clip_run, tmp_path_factory):
    """A 16 px image-embedding decoder run, a prior run (pipeline folders with run records, as training leaves them) and the two saved as
    one unCLIP pipeline folder."""
    from diffusers import DDPMScheduler

    from clipcond.models.clip import load_text_tower, load_vision_tower
    from clipcond.models.image_embedding import ImageEmbeddingTokens
    from clipcond.models.prior import create_prior, prior_config, set_embedding_statistics
    from clipcond.models.unet import create_unet, unet_config
    from clipcond.pipelines import ImageVariationPipeline, PriorPipeline, UnCLIPTextToImagePipeline
    from clipcond.text_encoding import context_length

    text_encoder, tokenizer = load_text_tower(tiny_clip_run)
    image_encoder, mean, std = load_vision_tower(tiny_clip_run)
    dim = image_encoder.config.projection_dim
    torch.manual_seed(0)
    unet = create_unet(unet_config("test", sample_size=16, cross_attention_dim=dim, image_embedding_dim=dim))
    decoder = ImageVariationPipeline(
        unet=unet,
        scheduler=DDPMScheduler(),
        image_encoder=image_encoder,
        embedding_tokens=ImageEmbeddingTokens(dim, 2, dim),
    )
    config = prior_config("test", embedding_dim=dim, num_embeddings=context_length(text_encoder, tokenizer))
    prior = create_prior(config)
    set_embedding_statistics(prior, torch.zeros(dim), torch.ones(dim))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False)
    prior_pipe = PriorPipeline(prior=prior, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
    root = tmp_path_factory.mktemp("unclip_runs")
    folders = {
        "decoder": _save_run(decoder, root / "decoder", tiny_clip_run, "decoder"),
        "prior": _save_run(prior_pipe, root / "prior", tiny_clip_run, "prior"),
    }
    UnCLIPTextToImagePipeline.from_runs(folders["prior"], folders["decoder"]).save_pretrained(root / "unclip")
    folders["unclip"] = root / "unclip"
    return folders


@pytest.fixture(scope="session")
def tiny_captioner(tiny_clip_run, shapes_data):
    """A random `test`-preset captioner (Llama LM, LLaVA projector) on the tiny CLIP's vision tower, untrained."""
    from transformers import LlamaForCausalLM

    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.models.captioner import Captioner, VisionProjector, lm_config
    from clipcond.models.clip import load_vision_tower
    from clipcond.tokenizer import PAD_TOKEN, train_tokenizer

    torch.manual_seed(0)
    vision, mean, std = load_vision_tower(tiny_clip_run)
    dataset = ImageCaptionDataset(shapes_data, split="train")
    tokenizer = train_tokenizer(
        dataset.captions + ["question: what shape is it? answer:"], vocab_size=300, pad_token=PAD_TOKEN
    )
    lm = LlamaForCausalLM(lm_config("test", tokenizer=tokenizer, max_position_embeddings=64))
    width, dim = vision.config.hidden_size, vision.config.projection_dim
    projector = VisionProjector(vision_width=width, embed_dim=dim, hidden_size=lm.config.hidden_size)
    return Captioner(vision, mean, std, projector.eval(), lm.eval(), tokenizer)


@pytest.fixture(scope="session")
def captioner_run(tiny_captioner, tmp_path_factory):
    """`tiny_captioner` saved as a captioner run folder (with a run record)."""
    folder = tmp_path_factory.mktemp("captioner_run")
    tiny_captioner.save_pretrained(folder)
    (folder / "clipcond_run.json").write_text(json.dumps({"kind": "clipcond-captioner", "summary": {"steps": 0}}))
    return folder


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random torchvision `inception_v3` state dict as safetensors (`tests/inception_weights.py`): what a user
    gives `--inception-weights`, without the download."""
    pytest.importorskip("torchvision")
    from inception_weights import write_random_inception

    return write_random_inception(tmp_path_factory.mktemp("inception") / "inception_v3.safetensors")
