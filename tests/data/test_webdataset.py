"""WebDataset shards: conversion round trip, brace patterns, the split across processes and workers, exact resume,
and training commands streaming shards."""

import json
import shutil
import tarfile

import pytest
import torch
from conftest import TINY_CLIP_ARGS
from torch.utils.data import DataLoader

from clipcond.data.convert import main as convert_main
from clipcond.data.folders import ImageCaptionDataset, collate_image_text
from clipcond.data.open import items_at, open_image_text_dataset
from clipcond.data.webdataset import ShardedImageCaptionDataset, expand_braces, is_shard_source, list_shards


@pytest.fixture(scope="module")
def shards(shapes_data, tmp_path_factory):
    """The 240 training images of `shapes_data` in 8 shards of 30."""
    out = tmp_path_factory.mktemp("shards")
    convert_main(
        [str(shapes_data), "--split", "train", "--to", "webdataset", "--shard-size", "30", "--output-dir", str(out)]
    )
    return out


def _pattern(folder) -> str:
    return str(folder / "{000000..000007}.tar")


def test_conversion_round_trip(shapes_data, shards, tmp_path, capsys):
    folder = ImageCaptionDataset(shapes_data, split="train")
    index = json.loads((shards / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [(e["url"], e["nsamples"]) for e in index["shardlist"]] == [(f"{k:06d}.tar", 30) for k in range(8)]
    assert index["clipcond"]["dataset_info"] == folder.info

    # WebDataset's layout: each sample's members consecutive under one zero-padded key
    with tarfile.open(shards / "000001.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000030.png", "000030.txt", "000030.json"] and len(names) == 90

    streamed = ShardedImageCaptionDataset(_pattern(shards))
    assert len(streamed) == 240 and streamed.info == folder.info
    assert streamed.captions == folder.captions and streamed.labels == folder.labels
    items = list(streamed)
    assert [s["index"] for s in items] == list(range(240))
    for i in (0, 31, 239):
        expected = folder[i]
        assert torch.equal(items[i]["pixel_values"], expected["pixel_values"])
        assert (items[i]["text"], items[i]["label"], items[i]["skipped"]) == (expected["text"], expected["label"], [])
    batch = collate_image_text(items[:4])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8

    # the json member keeps the metadata row (attributes included); the same data gives the same bytes
    with tarfile.open(shards / "000000.tar") as tar:
        row = json.loads(tar.extractfile("000000.json").read())
    assert row == {**folder.records[0], "label": folder.labels[0]}
    capsys.readouterr()
    again = tmp_path / "again"
    convert_main([str(shapes_data), "--shard-size", "30", "--output-dir", str(again)])
    assert json.loads(capsys.readouterr().out)["data"] == str(again / "{000000..000007}.tar")
    assert (again / "000003.tar").read_bytes() == (shards / "000003.tar").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_main([str(shapes_data), "--shard-size", "30", "--output-dir", str(again)])


def test_the_webdataset_library_reads_the_shards(shards):
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset(_pattern(shards), shardshuffle=False))
    assert len(samples) == 240
    assert samples[5]["__key__"] == "000005" and set(samples[5]) >= {"png", "txt", "json"}
    assert samples[5]["txt"].decode() == ShardedImageCaptionDataset(_pattern(shards)).captions[5]


def test_brace_patterns_and_shard_lists(shards):
    assert expand_braces("s/{000008..000010}.tar") == ["s/000008.tar", "s/000009.tar", "s/000010.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("{a,{b,c}}x") == ["ax", "bx", "cx"]
    assert expand_braces("{x}.tar") == ["{x}.tar"]
    assert list_shards(shards) == sorted(shards.glob("*.tar"))
    assert list_shards([shards / "000001.tar", str(shards / "{000002..000003}.tar")]) == [
        shards / f"00000{k}.tar" for k in (1, 2, 3)
    ]
    with pytest.raises(FileNotFoundError, match=r"2 of the 10 shards .*/000008\.tar"):
        list_shards(str(shards / "{000000..000009}.tar"))
    assert is_shard_source(_pattern(shards)) and is_shard_source(shards)
    assert not is_shard_source(shards.parent / "nowhere")
    with pytest.raises(ValueError, match="no splits"):
        open_image_text_dataset(_pattern(shards), split="test")


def test_shards_without_an_index_and_written_by_the_webdataset_library(shards, tmp_path):
    shutil.copy(shards / "000002.tar", tmp_path / "a.tar")  # no index.json: counted from the tar headers
    assert len(ShardedImageCaptionDataset(tmp_path / "a.tar")) == 30
    wds = pytest.importorskip("webdataset")
    with tarfile.open(tmp_path / "a.tar") as tar:
        png = tar.extractfile("000060.png").read()
    with wds.TarWriter(str(tmp_path / "theirs.tar")) as sink:
        for k in range(3):
            sink.write({"__key__": f"sample{k}", "png": png, "txt": f"caption {k}", "cls": k})
    items = list(ShardedImageCaptionDataset(tmp_path / "theirs.tar", resolution=16))
    assert [(s["text"], s["label"], s["index"]) for s in items] == [(f"caption {k}", str(k), k) for k in range(3)]
    assert items[0]["pixel_values"].shape == (3, 16, 16)


def _epoch_batches(dataset, num_workers, **configure):
    """The index batches of one process's epoch through a real DataLoader."""
    loader = DataLoader(
        dataset, batch_size=configure["batch_size"], num_workers=num_workers, collate_fn=collate_image_text
    )
    dataset.configure(num_workers=num_workers, **configure)
    return loader


def _indices(loader, dataset, epoch, start_batch=0):
    dataset.set_epoch(epoch, start_batch)
    return [batch["index"].tolist() for batch in loader]


def test_two_ranks_times_two_workers_see_every_sample_once_per_epoch(shards):
    seen = {0: [], 1: []}
    for rank in (0, 1):
        dataset = ShardedImageCaptionDataset(_pattern(shards), shuffle_buffer=16)
        loader = _epoch_batches(dataset, 2, batch_size=10, num_processes=2, process_index=rank, seed=3)
        assert dataset.num_batches == 12  # 4 streams of 2 shards (60 samples) = 6 batches each; 2 streams a rank
        for epoch in (0, 1):
            batches = _indices(loader, dataset, epoch)
            assert len(batches) == 12 and all(len(b) == 10 for b in batches)
            seen[epoch].append([i for b in batches for i in b])
    for epoch in (0, 1):
        assert sorted(seen[epoch][0] + seen[epoch][1]) == list(range(240))  # each sample once, by one rank
    assert seen[0][0] != seen[1][0]  # a new shard order and shuffle each epoch

    # more streams than shards: a clear error
    dataset = ShardedImageCaptionDataset(_pattern(shards))
    with pytest.raises(ValueError, match="8 shards cannot feed 3 processes x 4 dataloader workers"):
        dataset.configure(10, num_processes=3, num_workers=4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_the_same_order(shards, num_workers):
    dataset = ShardedImageCaptionDataset(str(shards / "{000000..000004}.tar"), shuffle_buffer=20)
    loader = _epoch_batches(dataset, num_workers, batch_size=7, seed=0, batches_multiple_of=2)
    # 150 samples: without workers 21 batches, cut to 20 (accumulation 2); with 2 workers streams of 2 or 3 shards
    assert dataset.num_batches == (20 if num_workers == 0 else 16)
    full = _indices(loader, dataset, epoch=1)
    assert len(full) == dataset.num_batches and len({i for b in full for i in b}) == 7 * len(full)
    for start in (3, 8):
        assert _indices(loader, dataset, epoch=1, start_batch=start) == full[start:]


def test_unreadable_images_are_replaced_by_the_next_readable_one(shapes_data, tmp_path, caplog):
    source = tmp_path / "source"
    shutil.copytree(shapes_data / "train", source)
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()[:12]]
    (source / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (source / rows[4]["file_name"]).write_bytes(b"not an image")
    convert_main([str(source), "--split", "train", "--shard-size", "6", "--output-dir", str(tmp_path / "s")])
    streamed = ShardedImageCaptionDataset(tmp_path / "s")
    folder = ImageCaptionDataset(source)
    items = list(streamed)
    assert [s["index"] for s in items] == [folder[i]["index"] for i in range(12)]  # 0 1 2 3 5 5 6 ...
    assert items[4]["skipped"] and items[4]["skipped"][0].endswith("000004.png") and not items[5]["skipped"]
    assert "skipping unreadable image" in caplog.text
    picked = items_at(streamed, [4, 11])
    assert [p["index"] for p in picked] == [5, 11] and picked[0]["skipped"] == items[4]["skipped"]
    # the last image unreadable: its place gets the last readable sample, as in the stream
    (source / rows[11]["file_name"]).write_bytes(b"not an image")
    convert_main([str(source), "--split", "train", "--shard-size", "6", "--output-dir", str(tmp_path / "t")])
    streamed = ShardedImageCaptionDataset(tmp_path / "t")
    assert items_at(streamed, [11])[0]["index"] == list(streamed)[11]["index"] == 10


def test_items_at_decodes_only_the_items_asked_for(shards, monkeypatch):
    streamed = ShardedImageCaptionDataset(_pattern(shards))
    everything = list(streamed.in_order())
    decoded, decode = [], ShardedImageCaptionDataset._decode
    monkeypatch.setattr(
        ShardedImageCaptionDataset, "_decode", lambda self, *args: decoded.append(args[0].key) or decode(self, *args)
    )
    picked = items_at(streamed, [239, 0, 117, 117])
    assert [p["index"] for p in picked] == [everything[i]["index"] for i in (239, 0, 117, 117)]
    assert torch.equal(picked[0]["pixel_values"], everything[239]["pixel_values"])
    assert len(decoded) == 3  # not the 240 of a pass over the stream
    with pytest.raises(IndexError, match=r"positions \[240\] out of range for a data set of 240 items"):
        items_at(streamed, [0, 240])


@pytest.mark.parametrize("piped", [False, True], ids=["local", "pipe"])
def test_train_clip_on_shards_resumes_exactly(shards, tmp_path, piped):
    from safetensors.torch import load_file

    from clipcond.train.clip import main

    data = f"pipe:cat {_pattern(shards)}" if piped else _pattern(shards)

    def run(out, *extra):
        argv = ["--data", data, "--output-dir", str(out), *TINY_CLIP_ARGS, "--validation-steps", "0"]
        assert main([*argv, "--max-train-steps", "4", "--checkpointing-steps", "2", *extra]) == 0
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    straight = tmp_path / "straight"
    run(straight, "--dataloader-num-workers", "2")
    record = json.loads((straight / "clipcond_run.json").read_text())
    assert record["summary"]["steps"] == 4 and record["data"]["num_samples"] == 240

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    run(resumed, "--dataloader-num-workers", "2", "--resume-from-checkpoint", "latest")
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_decoders_train_on_shards(shards, tiny_clip_run, tmp_path):
    from clipcond.train.decoder import main

    common = ["--clip", str(tiny_clip_run), "--data", _pattern(shards), "--model", "test", "--resolution", "16"]
    common += [
        "--train-batch-size",
        "4",
        "--lr-warmup-steps",
        "1",
        "--max-train-steps",
        "2",
        "--checkpointing-steps",
        "0",
    ]
    assert main([*common, "--output-dir", str(tmp_path / "text"), "--validation-steps", "0"]) == 0
    _reset_accelerate()
    record = json.loads((tmp_path / "text" / "clipcond_run.json").read_text())
    assert record["summary"]["steps"] == 2 and record["data"]["num_samples"] == 240
    assert (tmp_path / "text" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # the DALL-E 2 decoder: the image-embedding cache from one pass over the shards, validation images from them
    unclip = ["--conditioning", "image-embedding", "--validation-steps", "2", "--validation-inference-steps", "1"]
    unclip += ["--validation-sources", "2", "--validation-images-per-prompt", "1"]
    assert main([*common, *unclip, "--output-dir", str(tmp_path / "unclip")]) == 0
    _reset_accelerate()
    assert (tmp_path / "unclip" / "validation" / "step-2.png").is_file()


def test_prior_on_shards_equals_the_prior_on_the_folder(shapes_data, shards, tiny_clip_run, tmp_path):
    """The prior trains on cached embeddings by data set index: shards in folder order give the same caches, so
    the same weights."""
    from safetensors.torch import load_file

    from clipcond.train.prior import main

    weights = []
    for name, data in (("folder", shapes_data), ("shards", _pattern(shards))):
        out = tmp_path / name
        argv = ["--clip", str(tiny_clip_run), "--data", str(data), "--output-dir", str(out), "--model", "test"]
        argv += ["--train-batch-size", "8", "--max-train-steps", "2", "--lr-warmup-steps", "1"]
        assert main([*argv, "--validation-steps", "0", "--checkpointing-steps", "0"]) == 0
        _reset_accelerate()
        weights.append(load_file(out / "prior" / "diffusion_pytorch_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _served(folder):
    """An HTTP server over `folder` on a free local port, in a thread; its base URL and the server."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_remote_shards_read_as_the_local_ones(shards):
    """`pipe:` and http(s) shards (as WebDataset names them) give the local shards' items, captions and indices."""
    local = ShardedImageCaptionDataset(str(shards / "{000000..000002}.tar"))
    piped = ShardedImageCaptionDataset(f"pipe:cat {shards}/{{000000..000002}}.tar")
    assert is_shard_source(f"pipe:cat {shards}/000000.tar")
    assert [s.path for s in piped.shards] == [f"pipe:cat {shards}/{k:06d}.tar" for k in range(3)]
    assert len(piped) == len(local) == 90 and piped.captions == local.captions and piped.labels == local.labels
    url, server = _served(shards)
    try:
        fetched = ShardedImageCaptionDataset(f"{url}/{{000000..000002}}.tar")
        for remote in (piped, fetched):
            items, expected = list(remote), list(local)
            assert [s["index"] for s in items] == list(range(90))
            assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(items, expected))
            assert [a["text"] for a in items] == [b["text"] for b in expected]
        with pytest.raises(ValueError, match=r"the shard http://127\.0\.0\.1:\d+/missing\.tar cannot be read"):
            ShardedImageCaptionDataset(f"{url}/missing.tar")
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="the shard command 'exit 3' exited with status 3"):
        ShardedImageCaptionDataset("pipe:exit 3")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_piped_shards_resume_mid_epoch_in_the_local_order(shards, num_workers):
    local = ShardedImageCaptionDataset(str(shards / "{000000..000004}.tar"), shuffle_buffer=20)
    piped = ShardedImageCaptionDataset(f"pipe:cat {shards}/{{000000..000004}}.tar", shuffle_buffer=20)
    orders = []
    for dataset in (local, piped):
        loader = _epoch_batches(dataset, num_workers, batch_size=7, seed=0, batches_multiple_of=2)
        full = _indices(loader, dataset, epoch=1)
        assert _indices(loader, dataset, epoch=1, start_batch=5) == full[5:]  # exact resume, reading through
        orders.append(full)
    assert orders[0] == orders[1]


def test_a_remote_shard_that_changed_is_refused(shards, tmp_path):
    shard = tmp_path / "a.tar"
    shutil.copy(shards / "000000.tar", shard)
    piped = ShardedImageCaptionDataset(f"pipe:cat {shard}")
    shutil.copy(shards / "000001.tar", shard)  # same count: read as it now is
    assert [s["index"] for s in piped] == list(range(30))
    with tarfile.open(shards / "000002.tar") as source, tarfile.open(shard, "w") as short:
        for member in source.getmembers()[:30]:  # 10 samples
            short.addfile(member, source.extractfile(member))
    with pytest.raises(ValueError, match="now gives 10 samples, but held 30 when the data set was opened"):
        list(piped)
