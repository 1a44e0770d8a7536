"""The sharded row store: rows written batch by batch read back exactly, a few at a time; an interrupted build leaves
nothing a reader would take for a store; a damaged shard is refused when the store opens."""

import json
import os

import pytest
import torch

from clipcond.row_store import INDEX_NAME, RowStore, RowStoreError, RowStoreWriter


def _rows(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(n, 7, 5, generator=g).half(),
        "mask": torch.randint(0, 2, (n, 7), generator=g, dtype=torch.uint8),
        "length": torch.randint(0, 100, (n,), generator=g).to(torch.int16),
        "pooled": torch.randn(n, 3, generator=g).to(torch.bfloat16),
    }


def _write(path, rows: dict[str, torch.Tensor], batch: int, rows_per_shard: int, key: str = "k") -> RowStore:
    n = next(iter(rows.values())).shape[0]
    with RowStoreWriter(path, key=key, rows_per_shard=rows_per_shard) as writer:
        for start in range(0, n, batch):
            writer.append(**{name: t[start : start + batch] for name, t in rows.items()})
        return writer.finish(metadata={"what": "test"})


@pytest.mark.parametrize("mmap", [False, True], ids=["pread", "mmap"])
def test_random_rows_read_back_as_written(tmp_path, mmap):
    rows = _rows(53)
    _write(tmp_path / "store", rows, batch=6, rows_per_shard=10)  # batches that straddle shards; a short last one
    index = json.loads((tmp_path / "store" / INDEX_NAME).read_text())
    assert [s["rows"] for s in index["shards"]] == [10, 10, 10, 10, 10, 3] and index["num_rows"] == 53
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no scratch left

    store = RowStore(tmp_path / "store", key="k", mmap=mmap)  # reopened
    assert len(store) == 53 and store.metadata == {"what": "test"}
    picks = torch.randint(0, 53, (40,), generator=torch.Generator().manual_seed(1))
    picks[:3] = torch.tensor([52, 0, 52])  # the last row, the first, a repeat
    got = store.read(picks)
    for name, tensor in rows.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor[picks]), name
    assert torch.equal(store.read([-1], ["states"])["states"], rows["states"][-1:])

    # the first k entries of a row's leading axis: the leading token positions of a (L, W) row
    first = store.read(picks, ["states", "mask"], first={"states": 4, "mask": 2})
    assert torch.equal(first["states"], rows["states"][picks, :4]) and torch.equal(
        first["mask"], rows["mask"][picks, :2]
    )
    assert torch.equal(store.read_column("length"), rows["length"])
    with pytest.raises(IndexError, match="out of range for a store of 53 rows"):
        store.read([53])


def test_shards_follow_the_byte_budget(tmp_path):
    rows = _rows(40)
    row_bytes = 7 * 5 * 2 + 7 + 2 + 3 * 2
    with RowStoreWriter(tmp_path / "s", shard_bytes=row_bytes * 16) as writer:
        writer.append(**rows)
        store = writer.finish()
    assert [s.rows for s in store.shards] == [16, 16, 8]
    with RowStoreWriter(tmp_path / "t") as writer:
        writer.append(**rows)
        with pytest.raises(ValueError, match="do not fit the store's columns"):
            writer.append(
                states=rows["states"][:, :3], mask=rows["mask"], length=rows["length"], pooled=rows["pooled"]
            )


def test_an_interrupted_build_leaves_no_store_and_is_rebuilt(tmp_path):
    rows = _rows(30)
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt), RowStoreWriter(path, rows_per_shard=8) as writer:
        writer.append(**{k: v[:20] for k, v in rows.items()})  # two shards written to scratch
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # neither the store nor its scratch
    with pytest.raises(RowStoreError, match="no index.json"):
        RowStore(path)

    # a build killed outright (no clean-up ran) leaves only its scratch folder, without an index; the next build of
    # that name removes it and writes the store
    stale = tmp_path / f".store.{2**22 + 12345}.tmp"  # a pid that no process has
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"part")
    store = _write(path, rows, batch=7, rows_per_shard=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert torch.equal(store.read([29])["states"], rows["states"][29:])

    # a finished build replaces a store that was there
    other = _rows(30, seed=5)
    assert torch.equal(_write(path, other, 30, 8).read([3])["mask"], other["mask"][3:4])


def test_a_damaged_shard_is_refused_when_the_store_opens(tmp_path):
    rows = _rows(20)
    path = tmp_path / "store"
    _write(path, rows, batch=20, rows_per_shard=8)
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()

    with pytest.raises(RowStoreError, match="holds key 'k', not 'other'"):
        RowStore(path, key="other")
    shard.write_bytes(data[:-10])  # truncated, as by a full disk
    with pytest.raises(RowStoreError, match=r"shard-00001.safetensors has \d+ bytes, its index says \d+"):
        RowStore(path)
    shard.write_bytes(b"\xff" * len(data))  # same size, not safetensors
    with pytest.raises(RowStoreError, match="shard-00001.safetensors has no safetensors header"):
        RowStore(path)
    os.remove(shard)
    with pytest.raises(RowStoreError, match="shard-00001.safetensors is missing"):
        RowStore(path)
    # a foreign safetensors file of the same size whose tensors differ from the index
    from safetensors.torch import save_file

    save_file({"states": torch.zeros(8, 7, 5, dtype=torch.float16)}, shard)
    with pytest.raises(RowStoreError, match="shard-00001.safetensors"):
        RowStore(path)
