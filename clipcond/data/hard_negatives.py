"""Hard-negative captions for CLIP pretraining: a caption with its attributes, relation, count or position swapped,
so that it no longer describes the image while keeping almost every word.

NegCLIP (Yuksekgonul et al., "When and Why Vision-Language Models Behave like Bags-of-Words, and What to Do About
It?", ICLR 2023, sec. 4) adds such captions to each batch as extra negatives of the contrastive loss
(`clipcond.loss.ClipLoss`'s ``negative_features``): a model that ignores word order scores "a red circle left of a
blue square" and "a blue circle left of a red square" alike, and the loss then pays for it.

Kinds (`KINDS`, the values of `clipcond train clip --hard-negatives`):

- ``swap-attributes``: exchange the colours, or the shapes, of the two objects ("a red circle left of a blue
  square" -> "a blue circle left of a red square", or "a red square left of a blue circle");
- ``swap-relations``: the opposite relation ("left of" -> "right of", "above" -> "below"), or the two noun phrases
  exchanged around it ("a blue square left of a red circle");
- ``swap-count``: "two red circles" <-> "a red circle";
- ``swap-position``: a single object's place, "on the left" <-> "on the right", "at the top" <-> "at the bottom".

The vocabulary is the shapes data's (`clipcond.data.shapes`: its colours, shapes and phrase tables). A row of the
shapes data's metadata (``kind``, ``objects``, ``relation``) says which swaps are true negatives and which words
to exchange: a count scene has no relation to flip, even when its caption ends "one above the other". Any other
caption goes through the same edits over the words it holds. An edit keeps every other word, separator and the
case of the first letter; a caption with nothing to swap has no candidate (`swap` returns None).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from clipcond.data.shapes import (
    COLOURS,
    ONE_ABOVE_THE_OTHER,
    OPPOSITE_POSITION,
    OPPOSITE_RELATION,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SHAPES,
    SIDE_BY_SIDE,
    SIZE_WORDS,
    TWO_WORDS,
    article,
)
from clipcond.transfer import to_device

KINDS = ("swap-attributes", "swap-relations", "swap-count", "swap-position")
DETERMINERS = ("a", "an", "one", "the")
SHARE_SAMPLE = 2000  # captions checked by `coverage`, evenly spaced over the data set
LOW_SHARE = 0.2  # below this share of captions with a candidate, training warns that negatives are few

_WORD = re.compile(r"([A-Za-z]+)")  # re.split with a group keeps the separators: words at the odd positions
_SIZES = {word for words in SIZE_WORDS.values() for word in words}
OTHER_FIELD = {"colour": "shape", "shape": "colour"}  # the attribute that stays when the other is exchanged


def parse_kinds(text: str | None, flag: str = "--hard-negatives", choices: Sequence[str] = KINDS) -> tuple[str, ...]:
    """The kinds of a comma list ("swap-attributes,swap-relations") among `choices`; "" or "none" (or None) for
    none."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    kinds: list[str] = []
    for item in text.split(","):
        kind = item.strip().lower()
        if kind not in choices:
            raise ValueError(
                f"`{flag}` {text!r} names an unknown kind {item.strip()!r}; choose from {', '.join(choices)}"
            )
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


class _Caption:
    """A caption cut into words and what lies between them; edits return new caption strings."""

    def __init__(self, text: str):
        self.text = text
        self.parts = _WORD.split(text)  # separator, word, separator, word, ..., separator
        self.words = [w.lower() for w in self.parts[1::2]]

    def find(self, phrase: str, start: int = 0) -> int | None:
        """Index of the first word of `phrase` (words) at or after word `start`, or None."""
        target = phrase.split()
        for i in range(start, len(self.words) - len(target) + 1):
            if self.words[i : i + len(target)] == target:
                return i
        return None

    def replace(self, edits: Sequence[tuple[int, int, str]]) -> str:
        """The caption with each `(first word, number of words, new words)` span replaced; spans do not overlap.

        An "a" / "an" just before an edited span becomes the article of its new first word, so that a negative
        does not give itself away by its grammar ("a orange")."""
        edited = {first for first, _, _ in edits}
        edits = list(edits) + [
            (first - 1, 1, article(new))
            for first, _, new in edits
            if first > 0 and self.words[first - 1] in ("a", "an") and first - 1 not in edited
        ]
        parts = list(self.parts)
        for first, count, new in sorted(edits, reverse=True):  # from the end: earlier indices stay valid
            old = parts[2 * first + 1]
            if old[:1].isupper():
                new = new[:1].upper() + new[1:]
            parts[2 * first + 1 : 2 * (first + count)] = [new]
        return "".join(parts)

    def exchange(self, i: int, j: int, vocabulary: Sequence[str]) -> str:
        """Exchange words i and j, each keeping a plural "s" it had past its `vocabulary` stem."""
        stem_i, plural_i = _stem(self.words[i], vocabulary)
        stem_j, plural_j = _stem(self.words[j], vocabulary)
        return self.replace([(i, 1, stem_j + plural_i), (j, 1, stem_i + plural_j)])


def _stem(word: str, vocabulary: Sequence[str]) -> tuple[str, str]:
    """(vocabulary word, "s" or "") of a word that is a vocabulary word or its plural; ("", "") otherwise."""
    if word in vocabulary:
        return word, ""
    if word.endswith("s") and word[:-1] in vocabulary:
        return word[:-1], "s"
    return "", ""


def _positions(caption: _Caption, vocabulary: Sequence[str]) -> list[int]:
    return [i for i, word in enumerate(caption.words) if _stem(word, vocabulary)[0]]


def _phrase_at(caption: _Caption, table: dict[str, Sequence[str]], start: int = 0) -> tuple[int, str, int] | None:
    """The first phrase of `table` (its longest where several start at one word): (word index, key, phrase index)."""
    found = []
    for key, phrases in table.items():
        for number, phrase in enumerate(phrases):
            at = caption.find(phrase, start)
            if at is not None:
                found.append((at, -len(phrase.split()), key, number))
    if not found:
        return None
    at, _, key, number = min(found)
    return at, key, number


def _flip_phrase(caption: _Caption, at: int, key: str, number: int, table, opposite: dict[str, str]) -> str:
    """Replace the phrase `table[key][number]` at word `at` by the phrase of the opposite key with the same number
    (or the last one, where the opposite has fewer)."""
    old, new_phrases = table[key][number], table[opposite[key]]
    return caption.replace([(at, len(old.split()), new_phrases[min(number, len(new_phrases) - 1)])])


def _find_relation(
    caption: _Caption, table: dict[str, Sequence[str]], start: int = 0, skip_count: bool = True
) -> tuple[int, str, int] | None:
    """The first relation phrase of `table` at or after word `start` (as `_phrase_at`); with `skip_count`, not the
    "above" of a count caption's "one above the other", which names no relation."""
    while (found := _phrase_at(caption, table, start)) is not None:
        at, key, number = found
        if not (skip_count and caption.find(ONE_ABOVE_THE_OTHER, max(at - 1, 0)) == at - 1):
            return found
        start = at + len(RELATION_PHRASES[key][number].split())
    return None


def _noun_phrase_before(caption: _Caption, end: int) -> int | None:
    """First word of the noun phrase that ends at word `end - 1` on a shape: back to its determiner, <= 4 words."""
    if end < 1 or not _stem(caption.words[end - 1], SHAPES)[0]:
        return None
    for first in range(end - 2, max(end - 5, -1), -1):
        if caption.words[first] in DETERMINERS or caption.words[first] == "two":
            return first
    return None


def _noun_phrase_after(caption: _Caption, start: int) -> int | None:
    """One past the last word of the noun phrase that starts at word `start` on a determiner and ends on a shape."""
    if start >= len(caption.words) or caption.words[start] not in (*DETERMINERS, "two"):
        return None
    for last in range(start + 1, min(start + 5, len(caption.words))):
        if _stem(caption.words[last], SHAPES)[0]:
            return last + 1
    return None


# --------------------------------------------------------------------------------------------------- the kinds


def swap_attributes(
    caption: str, objects: Sequence[dict] | None = None, fields: Sequence[str] = ("colour", "shape")
) -> list[str]:
    """Binding negatives: the colours of the two objects exchanged, and their shapes exchanged (each of `fields`).

    With the shapes data's `objects` (two dicts with "colour" and "shape"), the words exchanged are theirs, found
    in order; otherwise the first two different colour words, and the first two different shape words, where the
    exchange changes what the caption describes (`_rebinds`)."""
    text = _Caption(caption)
    out = []
    vocabularies = {"colour": tuple(COLOURS), "shape": SHAPES}
    for field, vocabulary in ((field, vocabularies[field]) for field in fields):
        where = _positions(text, vocabulary)
        if objects is not None:
            first = next((i for i in where if _stem(text.words[i], vocabulary)[0] == objects[0][field]), None)
            second = next(
                (
                    i
                    for i in where
                    if first is not None and i > first and _stem(text.words[i], vocabulary)[0] == objects[1][field]
                ),
                None,
            )
            pair = (first, second) if objects[0][field] != objects[1][field] else (None, None)
        else:
            stems = [_stem(text.words[i], vocabulary)[0] for i in where]
            second = next((k for k in range(1, len(where)) if stems[k] != stems[0]), None)
            pair = (where[0], where[second]) if second is not None else (None, None)
            if None not in pair and not _rebinds(text, *pair, field):
                pair = (None, None)
        if None not in pair:
            out.append(text.exchange(*pair, vocabulary))
    return out


def _rebinds(caption: _Caption, i: int, j: int, field: str) -> bool:
    """Whether exchanging the `field` words i < j of a caption without metadata changes what it describes.

    It does when a relation phrase between them orders the two objects ("a red circle left of a blue circle"), or
    when the exchange changes the set of (colour, noun) pairs; without a relation, "a red circle and a blue circle"
    -> "a blue circle and a red circle" only reorders the same objects and is no negative."""
    found = _find_relation(caption, RELATION_PHRASES, i + 1)
    if found is not None and found[0] < j:
        return True
    # the other attribute of each object: a colour's noun (the first word after it that is no colour or size), a
    # shape's colour (among the attribute words just before it) and its plural "s", which stays where it is
    if field == "colour":
        return _noun_after(caption, i) != _noun_after(caption, j)
    plural_i, plural_j = _stem(caption.words[i], SHAPES)[1], _stem(caption.words[j], SHAPES)[1]
    return _colour_before(caption, i) != _colour_before(caption, j) or plural_i != plural_j


def _noun_after(caption: _Caption, i: int) -> str | None:
    words = caption.words[i + 1 :]
    return next((w for w in words if w not in COLOURS and w not in _SIZES and w != "and"), None)


def _colour_before(caption: _Caption, i: int) -> str | None:
    for k in range(i - 1, max(i - 4, -1), -1):
        if caption.words[k] in COLOURS:
            return caption.words[k]
        if caption.words[k] not in _SIZES:
            return None
    return None


def swap_relations(caption: str, relation: str | None = None) -> list[str]:
    """Relation negatives: the opposite relation phrase, and the two noun phrases exchanged around it.

    With the shapes data's `relation` (a key of `RELATION_PHRASES`), only its phrases are looked for; otherwise any
    relation phrase, except in "one above the other" (a count caption, which names no relation)."""
    text = _Caption(caption)
    table = RELATION_PHRASES if relation is None else {relation: RELATION_PHRASES[relation]}
    found = _find_relation(text, table, skip_count=relation is None)
    if found is None:
        return []
    at, key, number = found
    length = len(RELATION_PHRASES[key][number].split())
    out = [_flip_phrase(text, at, key, number, RELATION_PHRASES, OPPOSITE_RELATION)]
    before, after = _noun_phrase_before(text, at), _noun_phrase_after(text, at + length)
    if before is not None and after is not None:
        left = " ".join(text.words[before:at])
        right = " ".join(text.words[at + length : after])
        out.append(text.replace([(before, at - before, right), (at + length, after - at - length, left)]))
    return out


def swap_count(caption: str, kind: str | None = None) -> list[str]:
    """Count negatives: "two red circles" -> "a red circle" (also "a pair of ..."), else the first "a red circle" ->
    "two red circles". With the shapes data's scene `kind`, a count scene is made one object, any other two.

    A count caption's closing "side by side" or ", one above the other" goes with the second object: left on the one
    object, it would give the negative away by its words alone ("a red circle side by side")."""
    text = _Caption(caption)
    if kind in (None, "count"):
        for two in TWO_WORDS:
            at = text.find(two)
            shape = None if at is None else _shape_after_attributes(text, at + len(two.split()))
            if shape is not None and _stem(text.words[shape], SHAPES)[1]:
                after = text.words[at + len(two.split())]
                one = _without_count_tail(text, shape + 1)
                return [one.replace([(at, len(two.split()), article(after)), (shape, 1, text.words[shape][:-1])])]
        if kind == "count":
            return []
    for at, word in enumerate(text.words):
        shape = _shape_after_attributes(text, at + 1) if word in ("a", "an", "one") else None
        if shape is not None and not _stem(text.words[shape], SHAPES)[1]:
            return [text.replace([(at, 1, "two"), (shape, 1, text.words[shape] + "s")])]
    return []


def _without_count_tail(caption: _Caption, start: int) -> _Caption:
    """The caption without the first `SIDE_BY_SIDE` or `ONE_ABOVE_THE_OTHER` at or after word `start`, nor the
    separator before it (", "); the words before it keep their indices."""
    for phrase in (SIDE_BY_SIDE, ONE_ABOVE_THE_OTHER):
        at = caption.find(phrase, start)
        if at is not None:
            end = at + len(phrase.split())
            return _Caption("".join(caption.parts[: 2 * at] + caption.parts[2 * end :]))
    return caption


def _shape_after_attributes(caption: _Caption, start: int) -> int | None:
    """The index of the shape word that follows word `start` after at most 3 size or colour words, or None."""
    for i in range(start, min(start + 4, len(caption.words))):
        if _stem(caption.words[i], SHAPES)[0]:
            return i
        if caption.words[i] not in _SIZES and caption.words[i] not in COLOURS:
            return None
    return None


def swap_position(caption: str, position: str | None = None) -> list[str]:
    """Position negatives: "on the left" <-> "on the right", "at the top" <-> "at the bottom" (not "left of", a
    relation). With the shapes data's object `position`, only its phrases are looked for."""
    text = _Caption(caption)
    keys = OPPOSITE_POSITION if position is None else [position] if position in OPPOSITE_POSITION else []
    table = {key: POSITION_PHRASES[key] for key in keys}
    start = 0
    while (found := _phrase_at(text, table, start)) is not None:
        at, key, number = found
        end = at + len(POSITION_PHRASES[key][number].split())
        if end >= len(text.words) or text.words[end] != "of":
            return [_flip_phrase(text, at, key, number, POSITION_PHRASES, OPPOSITE_POSITION)]
        start = end
    return []


def swap(caption: str, kind: str, record: dict | None = None) -> list[str] | None:
    """The hard negatives of one kind for a caption, or None when it has nothing to swap.

    `record`: the caption's metadata row; a shapes-data row (with "kind" and "objects") decides which swaps are
    true negatives of its scene. Every negative differs from the caption."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    scene = record.get("kind") if is_scene(record) else None
    if scene is None:
        found = {
            "swap-attributes": lambda: swap_attributes(caption),
            "swap-relations": lambda: swap_relations(caption),
            "swap-count": lambda: swap_count(caption),
            "swap-position": lambda: swap_position(caption),
        }[kind]()
    else:
        objects = record["objects"]
        if kind == "swap-attributes":
            if scene != "relation":
                found = []
            else:
                found = (unplaced_swaps if is_unplaced(caption, record) else swap_attributes)(caption, objects)
        elif kind == "swap-relations":
            found = swap_relations(caption, record.get("relation")) if scene == "relation" else []
        elif kind == "swap-count":
            found = swap_count(caption, scene)
        else:
            found = swap_position(caption, objects[0].get("position")) if scene == "single" else []
    found = [negative for i, negative in enumerate(found) if negative != caption and negative not in found[:i]]
    return found or None


def is_unplaced(caption: str, record: dict) -> bool:
    """Whether the caption of a relation scene's row names no relation: "a red circle and a blue square"
    (`clipcond data shapes --unplaced-share`), true of the scene with its two objects in either place."""
    relation = record["relation"]
    return _find_relation(_Caption(caption), {relation: RELATION_PHRASES[relation]}, skip_count=False) is None


def told_apart_by_size(caption: str, objects: Sequence[dict]) -> bool:
    """Whether a caption's two objects differ in size and it names a size ("a big red circle and a blue circle")."""
    return objects[0].get("size") != objects[1].get("size") and any(w in _SIZES for w in _Caption(caption).words)


def unplaced_swaps(caption: str, objects: Sequence[dict], fields: Sequence[str] = ("colour", "shape")) -> list[str]:
    """The exchanges of `fields` in an unplaced caption ("A and B", no place named) that name other objects than it.

    Exchanging two objects' colours names other objects only where something besides the colours tells the two
    apart: their shapes, or a size the caption names ("a red circle and a blue circle" names the same two objects
    either way). Where only colours and shapes tell them apart, exchanging the colours names what exchanging the
    shapes names ("a blue circle and a red square" = "a red square and a blue circle"): the first is kept."""
    by_size = told_apart_by_size(caption, objects)
    found = []
    for field in fields:
        other = OTHER_FIELD[field]
        if objects[0][field] != objects[1][field] and (objects[0][other] != objects[1][other] or by_size):
            found += swap_attributes(caption, objects, fields=(field,))
    return found if by_size else found[:1]


def is_scene(record: dict | None) -> bool:
    return (
        isinstance(record, dict)
        and record.get("kind") in ("single", "relation", "count")
        and isinstance(record.get("objects"), list)
        and len(record["objects"]) == (1 if record["kind"] == "single" else 2)
        and (record["kind"] != "relation" or record.get("relation") in RELATION_PHRASES)
    )


# --------------------------------------------------------------------------------------------------- batches


@dataclass
class NegativeCandidates:
    """The hard-negative candidates of a batch of B captions, G = the number of kinds.

    `captions` lists every candidate, grouped by caption, then by kind; caption b's group g (its g-th kind that has
    candidates) is `captions[group_start[b, g] : group_start[b, g] + group_size[b, g]]`, and `num_groups[b]` counts
    its groups (0: no negative)."""

    captions: list[str]
    group_start: torch.Tensor  # (B, G) int64
    group_size: torch.Tensor  # (B, G) int64, 0 past num_groups
    num_groups: torch.Tensor  # (B,) int64


class HardNegatives:
    """Makes the candidates of the chosen kinds for the captions of a batch (`candidates`), reading each sample's
    metadata row from `records[sample["index"]]` when the data set has them (`ImageCaptionDataset.records`)."""

    def __init__(self, kinds: Sequence[str], records: Sequence[dict] | None = None):
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
        if not kinds:
            raise ValueError("HardNegatives needs at least one kind")
        self.kinds = tuple(kinds)
        self.records = records

    def for_caption(self, caption: str, record: dict | None = None) -> list[list[str]]:
        """One list per kind that has negatives for the caption, in the order of `kinds`."""
        groups = (swap(caption, kind, record) for kind in self.kinds)
        return [group for group in groups if group]

    def candidates(self, samples: Sequence[dict], positives: Sequence[Sequence[str]] = ()) -> NegativeCandidates:
        """The candidates of a batch of data set items (each with "text" and "index"). `positives[b]`: captions of
        other images of the batch made from sample b (its counterfactual twins'), which are no candidates: as
        negative columns of every image they would be a copy of a twin's own caption."""
        captions: list[str] = []
        start = torch.zeros(len(samples), len(self.kinds), dtype=torch.long)
        size = torch.zeros(len(samples), len(self.kinds), dtype=torch.long)
        count = torch.zeros(len(samples), dtype=torch.long)
        for b, sample in enumerate(samples):
            record = self.records[sample["index"]] if self.records is not None and "index" in sample else None
            groups = self.for_caption(sample["text"], record)
            if b < len(positives) and positives[b]:
                groups = [kept for group in groups if (kept := [c for c in group if c not in positives[b]])]
            count[b] = len(groups)
            for g, group in enumerate(groups):
                start[b, g], size[b, g] = len(captions), len(group)
                captions.extend(group)
        return NegativeCandidates(captions, start, size, count)

    def coverage(self, captions: Sequence[str], records: Sequence[dict] | None = None) -> dict:
        """The share of captions with a negative of any kind, and of each kind (`share_of_captions`)."""

        def found(i: int, kind: str) -> bool:
            return bool(swap(captions[i], kind, records[i] if records is not None else None))

        return share_of_captions(len(captions), self.kinds, found)


def share_of_captions(num_captions: int, kinds: Sequence[str], found: Callable[[int, str], bool]) -> dict:
    """The share of a data set's captions that `found(index, kind)` says have something of any of `kinds`, and of
    each kind, over up to `SHARE_SAMPLE` of them evenly spaced: {"share", "share_by_kind", "captions_checked"}."""
    n = num_captions
    picked = sorted({i * n // SHARE_SAMPLE for i in range(SHARE_SAMPLE)}) if n > SHARE_SAMPLE else range(n)
    any_kind, by_kind = 0, dict.fromkeys(kinds, 0)
    for i in picked:
        kinds_found = [kind for kind in kinds if found(i, kind)]
        any_kind += bool(kinds_found)
        for kind in kinds_found:
            by_kind[kind] += 1
    checked = max(len(picked), 1)
    return {
        "share": round(any_kind / checked, 4),
        "share_by_kind": {kind: round(c / checked, 4) for kind, c in by_kind.items()},
        "captions_checked": len(picked),
    }


def pick_negatives(candidates: NegativeCandidates, draws: torch.Tensor) -> torch.Tensor:
    """One candidate for each caption that has any: a kind uniformly among its kinds, then a candidate uniformly
    within it. `draws`: (B, 2) uniforms in [0, 1) (from the training generator, so a resumed run picks the same).

    Returns the indices into `candidates.captions`, (H,) for the H captions with a negative, in batch order, on the
    device of `draws`; no value goes to the host."""
    device = draws.device
    rows = (candidates.num_groups > 0).nonzero().squeeze(1)  # (H,) on the host: H is known without a sync
    num_groups = to_device(candidates.num_groups[rows], device)  # (H,)
    draws = draws[to_device(rows, device)]  # (H, 2)
    group = (draws[:, 0] * num_groups).long().clamp(max=num_groups - 1).unsqueeze(1)  # (H, 1)
    start = to_device(candidates.group_start[rows], device).gather(1, group).squeeze(1)  # (H,)
    size = to_device(candidates.group_size[rows], device).gather(1, group).squeeze(1)  # (H,)
    return start + (draws[:, 1] * size).long().clamp(max=size - 1)  # (H,)
