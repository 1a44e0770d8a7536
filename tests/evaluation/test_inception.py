"""Inception-v3 pool3 features for FID (`--inception-weights`): the safetensors file is checked before any load,
the features are batched and fp32, a set is at distance ~0 from itself, and pytorch-fid's weights are built with
its blocks."""

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipcond import cli
from clipcond.evaluation.frechet import FrechetSpaces, frechet_distance
from clipcond.evaluation.inception import (
    FEATURE_DIM,
    InceptionFeatures,
    InceptionWeights,
    check_inception_weights,
    load_inception,
)
from clipcond.lineage import file_hash

pytest.importorskip("torchvision")


def _images(n: int, seed: int, bright: bool = False) -> torch.Tensor:
    """uint8 (n, 3, 24, 24): noise, and with `bright` a lighter, redder set."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 128, (n, 3, 24, 24), generator=generator, dtype=torch.uint8)
    if bright:
        images = images + torch.tensor([120, 40, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    return images


def test_features_are_pool3_batched_and_a_set_is_at_distance_zero_from_itself(inception_weights):
    features = load_inception(inception_weights, batch_size=2)
    assert features.weights.kind == "torchvision" and features.weights.settings["blocks"] == "torchvision"
    assert features.weights.settings["sha256"] == hashlib.sha256(Path(features.weights.path).read_bytes()).hexdigest()
    images = _images(5, seed=0)
    pooled = features(images)
    assert pooled.shape == (5, FEATURE_DIM) and pooled.dtype == torch.float32 and torch.isfinite(pooled).all()
    assert pooled.std(dim=0).mean() > 0  # the images are told apart
    one_batch = InceptionFeatures(features.weights, batch_size=8)(images)
    torch.testing.assert_close(one_batch, pooled, rtol=1e-4, atol=1e-4)  # batching does not change a feature

    spaces = FrechetSpaces({"inception": features}, images)
    assert spaces.keys == ["fd_inception"]
    assert spaces.distances(images)["fd_inception"] == pytest.approx(0.0, abs=1e-3)
    other = spaces.distances(_images(5, seed=1, bright=True))["fd_inception"]
    assert other > 1.0 and other == pytest.approx(frechet_distance(features(_images(5, 1, bright=True)), pooled))
    assert spaces.distances(images[:1], suffix="_floor") == {"fd_inception_floor": None}  # no covariance of one
    with pytest.raises(ValueError, match="uint8 images"):
        features(images.float())


def _subset(source, target, keep):
    state = load_file(str(source))
    save_file({key: value for key, value in state.items() if keep(key, value)}, str(target))
    return target


def test_wrong_files_are_refused_naming_the_flag_and_the_path(inception_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^`--inception-weights` '.*missing.safetensors' does not exist$"):
        check_inception_weights(tmp_path / "missing.safetensors")
    pickle = tmp_path / "inception_v3_google.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, pickle)
    with pytest.raises(ValueError, match=r"`--inception-weights` '.*inception_v3_google.pth' is not a safetensors"):
        check_inception_weights(pickle)
    no_mixed_7c = _subset(inception_weights, tmp_path / "cut.safetensors", lambda key, _: "Mixed_7c" not in key)
    with pytest.raises(ValueError, match=r"cut.safetensors' .* tensors are missing \(Mixed_7c\..* more\)"):
        check_inception_weights(no_mixed_7c)
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.0.conv.weight": torch.zeros(32, 3, 3, 3)}, str(other))  # another model's key names
    with pytest.raises(ValueError, match="missing"):
        check_inception_weights(other)
    state = load_file(str(inception_weights))
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    state["head.weight"] = torch.zeros(2)
    reshaped = tmp_path / "reshaped.safetensors"
    save_file(state, str(reshaped))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) of the wrong shape and 1 unknown .*head.weight"):
        check_inception_weights(reshaped)
    # torchvision's file carries the classifiers too; one without them is accepted
    no_classifier = lambda key, _: not key.startswith(("fc.", "AuxLogits."))  # noqa: E731
    bare = _subset(inception_weights, tmp_path / "bare.safetensors", no_classifier)
    assert check_inception_weights(bare) == InceptionWeights(bare, "torchvision", file_hash(bare))


def test_the_command_refuses_a_wrong_file_in_one_line_before_loading(pipeline_run, shapes_data, tmp_path, capsys):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"not a safetensors file")
    out = tmp_path / "eval"
    argv = ["eval", "generation", "--model", str(pipeline_run), "--data", str(shapes_data), "--output-dir", str(out)]
    assert cli.main([*argv, "--inception-weights", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--inception-weights" in err[0] and str(bad) in err[0]
    assert not out.exists()


def test_without_torchvision_the_error_names_the_flag_and_the_package(inception_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.models.inception", None)  # its import now fails
    with pytest.raises(ValueError, match="`--inception-weights` needs torchvision"):
        check_inception_weights(inception_weights)


def test_pytorch_fids_weights_are_built_with_its_pooling(tmp_path, monkeypatch):
    """pytorch-fid's file (1008 classes) is recognised and built with the TF graph's blocks, whose pooling changes the
    features of the same weights."""
    from inception_weights import write_random_inception

    path = write_random_inception(tmp_path / "pt_inception.safetensors", kind="pytorch-fid", seed=1)
    fid = load_inception(path)
    assert fid.weights.kind == "pytorch-fid"
    images = _images(2, seed=2)
    as_torchvision = InceptionFeatures(InceptionWeights(path, "torchvision", file_hash(path)))(images)
    assert not torch.allclose(fid(images), as_torchvision, rtol=1e-3, atol=1e-3)

    # pytorch-fid itself, where installed (not a dependency), given the same weights instead of its download
    pytorch_fid = pytest.importorskip("pytorch_fid.inception")
    monkeypatch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *args, **kwargs: load_file(str(path)))
    theirs = pytorch_fid.InceptionV3([3]).eval()
    with torch.no_grad():
        expected = theirs(images.float() / 255)[0].flatten(1)
    torch.testing.assert_close(fid(images), expected, rtol=1e-4, atol=1e-4)
