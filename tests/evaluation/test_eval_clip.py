import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPModel  # noqa: E402

from clipcond.data.shapes import write_shapes_dataset  # noqa: E402
from clipcond.evaluation.clip import METRIC_KEYS, evaluate_clip, main  # noqa: E402
from clipcond.models.clip import clip_config, image_processor_for, load_clip  # noqa: E402
from clipcond.tokenizer import train_tokenizer  # noqa: E402

ZERO_SHOT_KEYS = ("zero_shot_top1", "zero_shot_balanced", "zero_shot_top1_seen", "zero_shot_top1_heldout")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_images=60, num_test_images=36, seed=0)  # 18 labelled test images, 4 held out
    return root


@pytest.fixture(scope="module")
def clip_run_dir(tmp_path_factory, shapes_root):
    """A random `test`-preset CLIP saved as `clipcond train clip` would save it."""
    run = tmp_path_factory.mktemp("run")
    captions = [json.loads(line)["text"] for line in (shapes_root / "train" / "metadata.jsonl").open()]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=32)
    config = clip_config(
        "test",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(run)
    tokenizer.save_pretrained(run)
    image_processor_for(config).save_pretrained(run)
    return run


def _check_ranges(metrics):
    assert tuple(metrics) == METRIC_KEYS
    for key, value in metrics.items():
        if not key.startswith("num_") and value is not None:
            assert 0.0 <= value <= 1.0, key
    for direction in ("image_to_text", "text_to_image"):
        assert metrics[f"{direction}_R@1"] <= metrics[f"{direction}_R@5"] <= metrics[f"{direction}_R@10"]


def test_main_on_shapes(clip_run_dir, shapes_root, capsys):
    assert main(["--model", str(clip_run_dir), "--data", str(shapes_root), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)  # stdout holds the JSON object and nothing else
    _check_ranges(metrics)
    assert (metrics["num_images"], metrics["num_classes"], metrics["num_zero_shot_images"]) == (36, 18, 18)
    assert all(metrics[key] is not None for key in ZERO_SHOT_KEYS)
    assert "embedding images" in captured.err  # the progress bar goes to stderr

    out = clip_run_dir / "eval"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("confusion_matrix.png", "similarity_matrix.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_main_without_labels_and_max_images(clip_run_dir, tmp_path, capsys):
    split = tmp_path / "data" / "test"
    split.mkdir(parents=True)
    rows = []
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 255 - 40 * i, 90)).save(split / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a colour number {i % 3}"}))
    (split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    argv = ["--model", str(clip_run_dir), "--data", str(tmp_path / "data"), "--device", "cpu"]
    assert main([*argv, "--output-dir", str(out), "--max-images", "4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    _check_ranges(metrics)
    assert all(metrics[key] is None for key in ZERO_SHOT_KEYS)
    assert (metrics["num_images"], metrics["num_classes"], metrics["num_zero_shot_images"]) == (4, 0, 0)
    assert metrics["image_to_text_R@5"] == 1.0  # 4 items: every one is within the top 5
    assert captured.err == ""
    assert (out / "similarity_matrix.png").is_file() and not (out / "confusion_matrix.png").exists()


def test_main_errors(clip_run_dir, shapes_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        main(["--model", str(tmp_path / "no-such-run"), "--data", str(shapes_root)])
    with pytest.raises(FileNotFoundError, match="no-such-data"):
        main(["--model", str(clip_run_dir), "--data", str(tmp_path / "no-such-data")])
    with pytest.raises(FileNotFoundError, match="no split 'valid'"):
        main(["--model", str(clip_run_dir), "--data", str(shapes_root), "--split", "valid", "--device", "cpu"])
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match="'a photo'"):
        main(["--model", str(clip_run_dir), "--data", str(shapes_root), "--templates", str(templates)])


# A stand-in CLIP whose features are known: an image is the one-hot of its pixel value, a text the one-hot of the
# class it names (the last axis when it names none). Zero-shot and retrieval results can then be computed by hand.
NAMES = ["blue square", "green circle", "red circle", "red triangle"]  # sorted


class FakeClipRun:
    image_size = 4

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.modes = []

    def encode_images(self, pixels):
        self.modes.append(self.model.training)
        return torch.nn.functional.one_hot(pixels[:, 0, 0, 0].long(), len(NAMES) + 1).float()

    def encode_text(self, texts, batch_size=256):
        texts = [" ".join(text.lower().split()) for text in texts]
        index = [next((i for i, name in enumerate(NAMES) if name in text), len(NAMES)) for text in texts]
        return torch.nn.functional.one_hot(torch.tensor(index), len(NAMES) + 1).float()


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items
        self.labels = [item["label"] for item in items]
        self.captions = [item["text"] for item in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def _item(pixel, text, label, size=4):
    return {"pixel_values": torch.full((3, size, size), pixel, dtype=torch.uint8), "text": text, "label": label}


def test_evaluate_clip_known_answer():
    items = [
        _item(0, "a blue square", "blue square"),
        _item(1, "a green circle", "green circle"),
        _item(2, "a red circle", "red circle"),
        _item(2, "a Red  circle", "red circle"),  # same caption as the item before, after normalisation
        _item(2, "a red triangle", "red triangle"),  # looks like a red circle: wrong, and held out
        _item(3, "a red triangle", "red triangle"),
        _item(4, "nothing at all", ""),  # no label: retrieval only
    ]
    clip_run = FakeClipRun()
    clip_run.model.train()
    metrics, extras = evaluate_clip(
        clip_run,
        ListDataset(items),
        templates=["a {}.", "a photo of a {}."],
        held_out=["Red Triangle", "purple square"],
        batch_size=3,
        progress=False,
    )
    assert clip_run.modes == [False, False, False] and clip_run.model.training  # eval inside, restored after
    assert metrics["zero_shot_top1"] == pytest.approx(5 / 6)
    assert metrics["zero_shot_balanced"] == pytest.approx((1 + 1 + 1 + 1 / 2) / 4)
    assert metrics["zero_shot_top1_seen"] == pytest.approx(1.0)
    assert metrics["zero_shot_top1_heldout"] == pytest.approx(1 / 2)
    assert (metrics["num_images"], metrics["num_classes"], metrics["num_zero_shot_images"]) == (7, 4, 6)
    # each group's figure says how many images it reads: 4 of seen classes, 2 of the held-out "red triangle"
    assert (metrics["num_zero_shot_images_seen"], metrics["num_zero_shot_images_heldout"]) == (4, 2)
    assert extras.classnames == NAMES and extras.heldout_classes == ["red triangle"]
    assert extras.confusion.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 1, 1]]
    assert extras.similarity.shape == (7, 7) and extras.similarity_captions[3] == "a Red  circle"

    # Image->text: every image's nearest texts are those of the class it looks like; only item 4 (a red triangle
    # that looks like a red circle) misses. Both red-circle captions match items 2 and 3, whichever wins the tie.
    assert metrics["image_to_text_R@1"] == pytest.approx(6 / 7)
    assert metrics["image_to_text_R@5"] == 1.0
    assert metrics["text_to_image_R@5"] == 1.0

    metrics, _ = evaluate_clip(clip_run, ListDataset(items), held_out=None, max_images=2, progress=False)
    assert metrics["num_images"] == 2 and metrics["num_classes"] == 4  # the classes of the whole split
    assert metrics["zero_shot_top1"] == 1.0
    assert metrics["zero_shot_top1_seen"] is None and metrics["zero_shot_top1_heldout"] is None


def test_evaluate_clip_input_errors():
    clip_run = FakeClipRun()
    with pytest.raises(ValueError, match="empty"):
        evaluate_clip(clip_run, ListDataset([]), progress=False)
    with pytest.raises(ValueError, match="resolution=4"):
        evaluate_clip(clip_run, ListDataset([_item(0, "a blue square", "blue square", size=8)]), progress=False)
    with pytest.raises(ValueError, match="max_images"):
        evaluate_clip(clip_run, ListDataset([_item(0, "a blue square", "")]), max_images=0, progress=False)


def test_evaluate_clip_with_real_model_matches_direct_encoding(clip_run_dir, shapes_root):
    from clipcond.data.folders import ImageCaptionDataset

    clip_run = load_clip(clip_run_dir)
    dataset = ImageCaptionDataset(shapes_root, split="test", resolution=clip_run.image_size)
    metrics, extras = evaluate_clip(clip_run, dataset, max_images=8, batch_size=3, progress=False)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(8)])
    expected = clip_run.encode_images(pixels) @ clip_run.encode_text(dataset.captions[:8]).T
    torch.testing.assert_close(extras.similarity, expected, atol=1e-5, rtol=1e-5)
    assert np.isfinite(extras.similarity.numpy()).all()


def test_a_json_config_sets_the_initial_temperature(tmp_path):
    import math

    from clipcond.models.clip import clip_presets

    spec = {**clip_presets()["test"], "logit_scale_init_value": math.log(5.0)}
    path = tmp_path / "clip.json"
    path.write_text(json.dumps(spec))
    ids = {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}
    config = clip_config(str(path), **ids)
    assert config.logit_scale_init_value == pytest.approx(math.log(5.0))
    assert CLIPModel(config).logit_scale.exp().item() == pytest.approx(5.0)
    assert clip_config("test", **ids).logit_scale_init_value == pytest.approx(math.log(1 / 0.07), abs=1e-4)  # 0.07


def test_unreadable_images_are_left_out_and_counted(clip_run_dir, shapes_root, tmp_path):
    """A corrupt test image is neither scored nor replaced by a second copy of its neighbour: the figures cover the
    readable images, and the metrics and the reference images say how many were not."""
    import shutil

    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.evaluation.judged import load_reference_images

    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    rows = [json.loads(line) for line in (root / "test" / "metadata.jsonl").open()]
    broken = [i for i, row in enumerate(rows) if row["label"]][:2]
    for i in broken:
        (root / "test" / rows[i]["file_name"]).write_bytes(b"not a png")
    clip_run = load_clip(clip_run_dir)
    dataset = ImageCaptionDataset(root, split="test", resolution=clip_run.image_size)
    metrics, extras = evaluate_clip(clip_run, dataset, batch_size=5, progress=False)
    assert metrics["num_unreadable_images"] == 2 and metrics["num_images"] == len(rows) - 2
    labelled = sum(1 for row in rows if row["label"])
    assert metrics["num_zero_shot_images"] == labelled - 2

    images, unreadable = load_reference_images(str(root), "test", clip_run.image_size)
    assert images.shape[0] == labelled - 2 and len(unreadable) == 2
    assert {Path(p).name for p in unreadable} == {rows[i]["file_name"] for i in broken}
