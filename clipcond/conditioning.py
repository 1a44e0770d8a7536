"""The frozen encoder's outputs, cached: `TextEmbeddingCache` holds the text encoder's outputs for a data set's
captions (`clipcond.text_encoding.encode_prompts`: per-token states, attention mask, pooled projected embedding),
computed once per encoder and stored on disk, so that a training step only looks rows up; a pipeline encodes its
prompts with the same function, so a decoder sees at inference the states it was trained on (up to the cache's fp16
rounding, ~1e-3 relative). `ImageEmbeddingCache` does the same for a data set's images under a frozen image encoder
(the target of the DALL-E 2 prior, the input of an image-embedding decoder).

The DALL-E 2 path's convention: "the CLIP text embedding" is the L2-normalised projected text embedding
(`TextEmbeddings.pooled`, normalised), "the CLIP image embedding" the L2-normalised projected image embedding
(`CLIPVisionModelWithProjection`'s `image_embeds`, normalised). The caches store the raw projected embeddings in
fp16; consumers normalise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors
import torch
from tqdm.auto import tqdm

from clipcond.finite import check_finite_tensor
from clipcond.image_cache import (
    encode_dataset,
    image_cache_key,
    load_or_build,
    read_image_cache,
    save_image_cache,
)
from clipcond.row_store import RowStore, RowStoreWriter
from clipcond.text_encoding import TextEmbeddings, context_length, encode_prompts

logger = logging.getLogger(__name__)

# What to do when a frozen encoder gives NaN or infinity (which the caches' fp16 also gives for values over 65504).
NOT_CACHED = "not cached; check the encoder's weights and the precision it runs in"


# ------------------------------------------------------------------------------------------ the embedding cache

CACHE_FORMAT_VERSION = 1
# A cache of at most this many bytes has every value checked finite when loaded; a larger one has the rows that
# each lookup reads checked (reading many GB at every start would cost more than the check is worth).
FULL_CHECK_BYTES = 256 * 1024 * 1024
# Config fields that say where or how a model was loaded, not what it computes; left out of the fingerprint.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_attn_implementation_internal",
    "_commit_hash",
    "torch_dtype",
    "dtype",
    "architectures",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
}


def _tokenizer_identity(tokenizer) -> dict:
    """What decides the token ids of a text: the full fast-tokenizer definition, or the vocabulary of a slow one."""
    if getattr(tokenizer, "is_fast", False):
        # normaliser, pre-tokeniser, vocab, merges, template; without the padding and truncation settings, which
        # the last call left behind (encode_prompts passes its own)
        definition = json.loads(tokenizer.backend_tokenizer.to_str())
        definition = json.dumps({k: v for k, v in definition.items() if k not in ("padding", "truncation")})
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "definition": hashlib.sha256(definition.encode()).hexdigest(),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "padding_side": tokenizer.padding_side,
    }


def model_fingerprint(model, **identity) -> str:
    """SHA-256 (hex) of what decides a model's outputs: its class, config and every weight, plus `identity`
    (JSON-able facts beside the model that change its outputs, e.g. the tokenizer). Two models with the same
    fingerprint compute the same function."""
    digest = hashlib.sha256()
    if hasattr(model.config, "to_dict"):  # a transformers config
        config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    else:  # a diffusers one (ConfigMixin, e.g. open_clip's text tower): a dict, with `_class_name` and the like
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    header = {"class": type(model).__name__, "config": config, **identity}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_fingerprint(text_encoder, tokenizer, max_length: int) -> str:
    """The `model_fingerprint` of a text encoder with its tokenizer and context length. Two encoders with the same
    fingerprint give the same states for the same prompt."""
    return model_fingerprint(text_encoder, tokenizer=_tokenizer_identity(tokenizer), max_length=max_length)


def vision_fingerprint(vision_model) -> str:
    """The `model_fingerprint` of an image encoder (the pixel normalisation and resolution are the caller's)."""
    return model_fingerprint(vision_model)


def unique_captions(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions in order of first appearance, and for each input caption its row among them (N,)."""
    unique = list(dict.fromkeys(captions))
    row = {caption: i for i, caption in enumerate(unique)}
    return unique, torch.tensor([row[c] for c in captions], dtype=torch.long)


class TextEmbeddingCache:
    """The frozen text encoder's outputs for a fixed list of captions, computed once and stored on disk.

    Rows are the distinct captions (`captions`), in order of first appearance: per-token states (U, L, W) and
    pooled embeddings (U, D) in fp16, attention masks (U, L), plus the empty prompt's (the target of caption
    dropout, and the unconditional half of classifier-free guidance at inference).

    The store is the folder `CACHE_DIR/text-embeddings-<key>/`, a `clipcond.row_store.RowStore` (safetensors shards
    and an index written last), where `key` hashes the encoder's fingerprint (`encoder_fingerprint`: weights,
    config, tokenizer, context length) and the caption list: a changed encoder or data set gets a new folder, never
    a stale one. Building holds one shard at a time and puts the finished folder in place by a rename, so a run
    killed while writing leaves no half cache; several runs may share a cache folder. A loaded cache keeps in memory
    only the empty prompt's row and each row's attended length (a 16-bit integer per caption); `lookup` reads the
    rows it is asked for from disk, so a cache of any size fits (a CLIP-L-sized encoder stores about 118 KB a
    caption). A cache of the earlier single-file layout (`text-embeddings-<key>.safetensors`) is converted once,
    without running the encoder.

    Use `build_or_load`, then `lookup(rows)` per batch; training never runs the encoder. The constructor also takes
    rows in memory (`TextEmbeddings`), for tests and small lists built by hand.
    """

    def __init__(
        self,
        captions: list[str],
        embeddings: TextEmbeddings | RowStore,
        empty: TextEmbeddings,
        key: str,
        path: Path,
        *,
        checked: bool = True,
    ):
        self.captions = captions
        self._checked = checked  # every stored value was checked finite (at build or load)
        self.empty = empty  # the empty prompt's rows, with a batch axis of 1, in memory
        self.key = key
        self.path = path
        if isinstance(embeddings, RowStore):
            assert len(embeddings) == len(captions) + 1, "one row per caption, then the empty prompt"
            self._store, self._memory = embeddings, None
            lengths = embeddings.read_column("attended")[: len(captions)]
        else:
            assert embeddings.hidden_states.shape[0] == len(captions), "one row per caption"
            self._store, self._memory = None, embeddings
            lengths = _attended_lengths(embeddings.attention_mask)
        # (U,) int16: through which column each row attends (0: to nothing); `attended_columns` reads only these
        self.attended_lengths = lengths
        self._empty_length = int(_attended_lengths(empty.attention_mask)[0])

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def embeddings(self) -> TextEmbeddings:
        """Every row at once (U, ...), fp16 states and pooled, uint8 mask: reads the whole cache into memory, for
        small caches and tests; training reads rows through `lookup`."""
        if self._memory is not None:
            return self._memory
        return self._rows(torch.arange(len(self), device="cpu"), None)

    def _rows(self, caption_indices: torch.Tensor, columns: int | None) -> TextEmbeddings:
        if self._memory is not None:
            emb = self._memory[caption_indices]
            return emb if columns is None else emb.first_columns(columns)
        first = None if columns is None else {"hidden_states": columns, "attention_mask": columns}
        names = [n for n in ("hidden_states", "attention_mask", "pooled") if n in self._store.columns]
        rows = self._store.read(torch.as_tensor(caption_indices, device="cpu").reshape(-1), names, first=first)
        if not self._checked:  # too large to check every value at load: the rows read are checked here
            for name in ("hidden_states", "pooled"):
                if name in rows:
                    check_finite_tensor(
                        rows[name], f"the text-embedding cache {str(self.path)!r}", "delete it to rebuild it"
                    )
        return TextEmbeddings(rows["hidden_states"], rows["attention_mask"], rows.get("pooled"))

    def lookup(self, caption_indices: torch.Tensor, columns: int | None = None) -> TextEmbeddings:
        """Rows of the distinct captions (B,) -> their embeddings: float32 states and pooled, long mask, on CPU; the
        first `columns` token positions only, when given (only those are read)."""
        return _from_storage(self._rows(caption_indices, columns), None)

    def lookup_empty(self, batch_size: int = 1, columns: int | None = None) -> TextEmbeddings:
        """The empty prompt's embeddings repeated `batch_size` times, typed as `lookup`'s."""
        rows = torch.zeros(batch_size, dtype=torch.long, device=self.empty.attention_mask.device)
        return _from_storage(self.empty[rows], columns)

    def attended_columns(self, caption_indices: torch.Tensor, with_empty: bool = False, multiple: int = 1) -> int:
        """`attended_columns` of these rows (and of the empty prompt's, when it may replace one), from the stored
        lengths on the CPU."""
        lengths = self.attended_lengths[caption_indices].reshape(-1).tolist()
        if with_empty:
            lengths.append(self._empty_length)
        total = self.empty.attention_mask.shape[1]
        if not lengths or min(lengths) == 0:  # a row that attends to nothing needs every column
            return total
        return min(-(-max(lengths) // multiple) * multiple, total)

    @staticmethod
    def cache_key(
        text_encoder, tokenizer, captions: list[str], max_length: int | None = None, mask_padding: bool = True
    ) -> str:
        max_length = max_length or context_length(text_encoder, tokenizer)
        digest = hashlib.sha256()
        digest.update(f"clipcond-text-embeddings-v{CACHE_FORMAT_VERSION}\n".encode())
        if not mask_padding:  # only then, so that the caches made before the option keep their names
            digest.update(b"unmasked padding\n")
        digest.update(encoder_fingerprint(text_encoder, tokenizer, max_length).encode())
        digest.update(json.dumps(captions).encode())
        return digest.hexdigest()[:32]

    @classmethod
    def build_or_load(
        cls,
        text_encoder,
        tokenizer,
        captions: list[str],
        cache_dir: str | os.PathLike,
        *,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = True,
        mask_padding: bool = True,
    ) -> TextEmbeddingCache:
        """Load the cache of these distinct `captions` under this encoder from `cache_dir`, or build and store it.

        Building encodes the captions with `encode_prompts` in batches of `batch_size` (with a progress bar), with
        or without masking the padding (`mask_padding`, part of the cache's key), and writes each batch out as it
        comes. A store that cannot be read (missing or truncated shard, foreign file, non-finite values) is rebuilt
        with a warning.
        """
        if len(set(captions)) != len(captions):
            raise ValueError("`captions` must be distinct; use `unique_captions` to map a data set's captions to rows")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        max_length = context_length(text_encoder, tokenizer)
        key = cls.cache_key(text_encoder, tokenizer, captions, max_length, mask_padding)
        path = Path(cache_dir) / f"text-embeddings-{key}"
        if path.is_dir():
            try:
                cache = cls._load(path, captions, key)
                logger.info("loaded %d cached caption embeddings from %s", len(captions), path)
                return cache
            except (OSError, ValueError, KeyError) as err:
                logger.warning("the text-embedding cache %s cannot be used (%s); rebuilding it", path, err)
        single_file = path.with_name(f"{path.name}.safetensors")  # the layout before the row store
        if single_file.is_file():
            try:
                cache = cls._convert_single_file(single_file, path, captions, key)
                logger.info(
                    "converted the single-file text-embedding cache %s to the sharded layout in %s and removed it",
                    single_file,
                    path,
                )
                return cache
            except (OSError, ValueError, KeyError, safetensors.SafetensorError) as err:
                logger.warning("the text-embedding cache %s cannot be used (%s); rebuilding it", single_file, err)

        encoding = {"device": device, "max_length": max_length, "mask_padding": mask_padding}
        what = f"the text encoder's output (to be cached in {str(path)!r})"
        with RowStoreWriter(path, key=key) as writer:
            for start in tqdm(
                range(0, len(captions), batch_size), desc="encoding captions", disable=not progress, dynamic_ncols=True
            ):
                chunk = encode_prompts(text_encoder, tokenizer, captions[start : start + batch_size], **encoding)
                writer.append(**_store_columns(_to_storage(chunk), what))
            empty = _to_storage(encode_prompts(text_encoder, tokenizer, [""], **encoding))
            writer.append(**_store_columns(empty, what))
            store = writer.finish(metadata={"format": CACHE_FORMAT_VERSION, "num_captions": len(captions)})
        logger.info("cached the embeddings of %d captions in %s", len(captions), path)
        return cls(captions, store, empty, key, path)

    @classmethod
    def _load(cls, path: Path, captions: list[str], key: str) -> TextEmbeddingCache:
        store = RowStore(path, key=key)
        if store.metadata.get("format") != CACHE_FORMAT_VERSION or not {"hidden_states", "attention_mask"} <= set(
            store.columns
        ):
            raise ValueError(
                f"its index {store.metadata} is not a text-embedding cache of format {CACHE_FORMAT_VERSION}"
            )
        if len(store) != len(captions) + 1:
            raise ValueError(f"it holds {len(store) - 1} rows for {len(captions)} captions")
        # Every value is checked while it is built; here the sizes (above) and, where it is small enough to read
        # in a moment, every value again. Larger caches check the rows each lookup reads (`_check_rows`).
        checked = sum(s.path.stat().st_size for s in store.shards) <= FULL_CHECK_BYTES
        if checked:
            for name in ("hidden_states", "pooled"):
                if name in store.columns:
                    _check_finite_column(store, name)
        last = store.read([len(captions)])
        empty = TextEmbeddings(last["hidden_states"], last["attention_mask"], last.get("pooled"))
        check_finite_tensor(empty.hidden_states, "its empty prompt's row")
        return cls(captions, store, empty, key, path, checked=checked)

    @classmethod
    def _convert_single_file(cls, old: Path, path: Path, captions: list[str], key: str) -> TextEmbeddingCache:
        """Copy a cache of the single-file layout into a row store at `path`, a slice at a time; then remove it."""
        with safetensors.safe_open(old, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("key") != key or metadata.get("format") != str(CACHE_FORMAT_VERSION):
                raise ValueError(f"its metadata {metadata} does not match key {key}")
            with_pooled = "pooled" in set(f.keys())
            n = f.get_slice("hidden_states").get_shape()[0]
            if n != len(captions) or f.get_slice("attention_mask").get_shape()[0] != n:
                raise ValueError(f"it holds {n} rows for {len(captions)} captions")

            def part(prefix: str, rows: slice) -> TextEmbeddings:
                hidden, mask = (f.get_slice(prefix + name)[rows] for name in ("hidden_states", "attention_mask"))
                return TextEmbeddings(hidden, mask, f.get_slice(prefix + "pooled")[rows] if with_pooled else None)

            with RowStoreWriter(path, key=key) as writer:  # an error names the tensor; its warning the file
                for start in range(0, n, 1024):
                    writer.append(**_store_columns(part("", slice(start, start + 1024))))
                empty = part("empty.", slice(0, 1))
                writer.append(**_store_columns(empty))
                store = writer.finish(metadata={"format": CACHE_FORMAT_VERSION, "num_captions": n})
        old.unlink()
        return cls(captions, store, empty, key, path)


def _check_finite_column(store: RowStore, name: str) -> None:
    """Raise ValueError naming the column and the rows when a column of `store` holds NaN or infinity; read a few
    MB at a time. (The warning that catches it names the cache.)"""
    start = 0
    for part in store.iter_column(name):
        bad = ~torch.isfinite(part).reshape(part.shape[0], -1)  # (n, values per row)
        if bool(bad.any()):
            first = start + int(bad.any(dim=1).nonzero()[0])
            raise ValueError(
                f"its tensor {name!r} holds {int(bad.sum())} non-finite value(s) (NaN or infinity) in rows {start} "
                f"to {start + part.shape[0] - 1}, the first in row {first}"
            )
        start += part.shape[0]


def _attended_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask -> (B,) int16: one past the last column each row attends to (0 for a row that attends to none)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1).to("cpu", torch.int16)


def _store_columns(emb: TextEmbeddings, what: str | None = None) -> dict[str, torch.Tensor]:
    """Stored rows (`_to_storage`) as the row store's columns, each row's attended length added, checked finite:
    an error names `what` (the encoder's output, which is then not cached) or, without it, the tensor."""
    columns = {"hidden_states": emb.hidden_states, "attention_mask": emb.attention_mask}
    if emb.pooled is not None:
        columns["pooled"] = emb.pooled
    for name in ("hidden_states", "pooled"):
        if name in columns:
            if what is None:
                check_finite_tensor(columns[name], f"its tensor {name!r}")
            else:
                check_finite_tensor(columns[name], what, NOT_CACHED)
    columns["attended"] = _attended_lengths(emb.attention_mask)
    return columns


def _from_storage(emb: TextEmbeddings, columns: int | None) -> TextEmbeddings:
    """Cached rows as consumers take them: float32 states and pooled, long mask; the first `columns` positions."""
    if columns is not None:
        emb = emb.first_columns(columns)
    return TextEmbeddings(
        hidden_states=emb.hidden_states.float(),
        attention_mask=emb.attention_mask.long(),
        pooled=None if emb.pooled is None else emb.pooled.float(),
    )


def _to_storage(emb: TextEmbeddings) -> TextEmbeddings:
    """fp16 states on CPU (half the memory and disk of fp32; CLIP's layer-normed states are far inside its range),
    uint8 masks."""
    return TextEmbeddings(
        hidden_states=emb.hidden_states.detach().to("cpu", torch.float16),
        attention_mask=emb.attention_mask.detach().to("cpu", torch.uint8),
        pooled=None if emb.pooled is None else emb.pooled.detach().to("cpu", torch.float16),
    )


# ------------------------------------------------------------------------------------ the image-embedding cache

IMAGE_CACHE_FORMAT_VERSION = 1
# A cache of at most this many bytes has every value checked finite when loaded; a larger one has the rows that
# each lookup reads checked (reading many GB at every start would cost more than the check is worth).
FULL_CHECK_BYTES = 256 * 1024 * 1024


class ImageEmbeddingCache:
    """The frozen image encoder's embeddings of a data set's images, computed once and stored on disk.

    Rows follow the data set's indices: `embeddings[i]` (N, D) fp16 is the projected, unnormalised image embedding
    (`CLIPVisionModelWithProjection`'s `image_embeds`) of what `dataset[i]` returns. For an unreadable image that
    is the item the data set substitutes, whose index is `item_indices[i]` (equal to i for readable images), so
    pair row i with the caption of `item_indices[i]`. Consumers normalise; "the CLIP image embedding" of the
    DALL-E 2 path is the L2-normalised row.

    The file is `CACHE_DIR/image-embeddings-<key>.safetensors`, where `key` hashes the encoder's fingerprint
    (`vision_fingerprint`: class, config, weights), the pixel normalisation, the resolution and crop, and the image
    list (each file's path relative to the data set's root, size and modification time): a changed encoder or
    image file gets a new file, never a stale one. It is written to a temporary name and renamed; a file that
    cannot be read is rebuilt with a warning.
    """

    def __init__(self, embeddings: torch.Tensor, item_indices: torch.Tensor, key: str, path: Path, skipped: list[str]):
        assert embeddings.ndim == 2 and item_indices.shape == (embeddings.shape[0],), "one row per item"
        self.embeddings = embeddings  # (N, D) fp16, raw projected
        self.item_indices = item_indices  # (N,) int64: the item each row was computed from
        self.key = key
        self.path = path
        self.skipped = skipped  # unreadable image files met while building

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def lookup(self, dataset_indices: torch.Tensor) -> torch.Tensor:
        """Data set indices (B,) -> their raw projected image embeddings (B, D), float32 on the CPU."""
        return self.embeddings[dataset_indices].float()

    @staticmethod
    def cache_key(vision_model, dataset, image_mean, image_std) -> str:
        return image_cache_key(
            "image-embeddings",
            IMAGE_CACHE_FORMAT_VERSION,
            vision_fingerprint(vision_model),
            dataset,
            image_mean=[float(m) for m in image_mean],
            image_std=[float(s) for s in image_std],
        )

    @classmethod
    def build_or_load(
        cls,
        vision_model,
        dataset,
        cache_dir: str | os.PathLike,
        *,
        image_mean,
        image_std,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> ImageEmbeddingCache:
        """Load the embeddings of `dataset`'s images under this encoder from `cache_dir`, or compute and store them.

        Args:
            vision_model: a frozen `CLIPVisionModelWithProjection` (see `clipcond.models.clip.load_vision_tower`).
            dataset: an `ImageCaptionDataset` at the encoder's resolution.
            image_mean, image_std: the encoder's pixel statistics (per channel, for pixels in [0, 1]).
            batch_size: images per encoder call.
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError(f"the data set {dataset!r} is empty; there is nothing to embed")
        key = cls.cache_key(vision_model, dataset, image_mean, image_std)
        path = Path(cache_dir) / f"image-embeddings-{key}.safetensors"

        def build() -> ImageEmbeddingCache:
            statistics = {"image_mean": image_mean, "image_std": image_std}
            encoding = {"batch_size": batch_size, "device": device, "progress": progress}
            embeddings, item_indices, skipped = embed_images(vision_model, dataset, **statistics, **encoding)
            where = f"the image encoder's output (to be cached in {str(path)!r})"
            check_finite_tensor(embeddings, where, NOT_CACHED)
            cache = cls(embeddings, item_indices, key, path, skipped)
            cache._save()
            return cache

        return load_or_build(path, lambda: cls._load(path, len(dataset), key), build, "image-embedding")

    def _save(self) -> None:
        tensors = {"embeddings": self.embeddings, "item_indices": self.item_indices}
        save_image_cache(self.path, tensors, version=IMAGE_CACHE_FORMAT_VERSION, key=self.key, skipped=self.skipped)

    @classmethod
    def _load(cls, path: Path, num_images: int, key: str) -> ImageEmbeddingCache:
        names = ("embeddings", "item_indices")
        tensors, skipped = read_image_cache(path, names, version=IMAGE_CACHE_FORMAT_VERSION, key=key)
        embeddings, item_indices = tensors["embeddings"], tensors["item_indices"]
        if embeddings.ndim != 2 or embeddings.shape[0] != num_images or item_indices.shape != (num_images,):
            raise ValueError(f"it holds {tuple(embeddings.shape)} embeddings for {num_images} images")
        check_finite_tensor(embeddings, "its tensor 'embeddings'")  # the warning that catches it names the file
        return cls(embeddings, item_indices, key, path, skipped)


@torch.no_grad()
def embed_images(
    vision_model, dataset, *, image_mean, image_std, batch_size: int = 256, device=None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Raw projected embeddings (N, D) fp16 of every item of `dataset` (an `ImageCaptionDataset`, or a `Subset` of
    one), the index of the item each row came from (N,), and the unreadable files met."""
    from clipcond.models.clip_pixels import normalize_pixels

    device = torch.device(device) if device is not None else vision_model.device
    size = vision_model.config.image_size

    def embed(pixels: torch.Tensor) -> tuple[torch.Tensor]:
        if pixels.shape[-2:] != (size, size):
            raise ValueError(
                f"the data set gives {tuple(pixels.shape[-2:])} images but the image encoder expects {size} x {size}; "
                f"build the data set with resolution={size}"
            )
        pixel_values = normalize_pixels(pixels.to(device), image_mean, image_std).to(vision_model.dtype)
        return (vision_model(pixel_values=pixel_values).image_embeds.detach().to("cpu", torch.float16),)

    (embeddings,), indices, skipped = encode_dataset(
        dataset, embed, batch_size=batch_size, desc="encoding images", progress=progress
    )
    return embeddings, indices, skipped
