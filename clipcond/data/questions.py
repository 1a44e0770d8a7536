"""Question-answer pairs about a shapes image, generated from its metadata (`clipcond.data.shapes`), for training
and evaluating a captioner that answers questions (`clipcond ask`).

Each metadata row (`objects` with colour, shape, size, position; `kind` single / relation / count) gives the
questions it can answer unambiguously, each with a one-word answer:

    count     "how many objects are there?"          one | two                  every image
    colour    "what colour is the shape?"            red, green, ...            one object, or two alike
              "what colour is the circle?"                                      two objects of different shapes
    shape     "what shape is it?"                    circle | square | triangle one object, or two alike
              "what shape is the red one?"                                      two objects of different colours
    position  "where is the red circle?"             left | right | top | bottom | centre   each distinct object
    describe  "describe the image in detail."        every image

`describe` asks for the whole scene in one canonical sentence: every attribute, always in the same words ("a small
circle in red at the top", "a circle in red left of a square in blue", "two triangles in green side by side"). The
data's own captions vary their templates and name a single object's position only in some of them, so a caption can
leave the position out; the description may not (LLaVA's "detailed description" instructions play this part). It
names the shape before the colour: held-out colour-shape pairs never occur together in the training text, so a
language model that writes the colour first learns to follow "blue" with the shapes seen after it, whatever the image
shows; written first, the shape is read off the image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipcond.data.shapes import POSITION_PHRASE

QUESTION_TYPES = ("count", "colour", "shape", "position", "describe")
COUNT_WORDS = {1: "one", 2: "two"}
DESCRIBE = "describe the image in detail."


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_TYPES
    question: str
    answer: str


def questions_for(record: dict) -> list[Question]:
    """The questions a shapes metadata row answers, in a fixed order; [] for a row without objects."""
    objects = record.get("objects") or []
    if not objects or len(objects) not in COUNT_WORDS:
        return []
    questions = [Question("count", "how many objects are there?", COUNT_WORDS[len(objects)])]
    colours = {o["colour"] for o in objects}
    shapes = {o["shape"] for o in objects}
    if len(colours) == 1 and len(shapes) == 1:  # one object, or two alike
        questions.append(Question("colour", "what colour is the shape?", objects[0]["colour"]))
        questions.append(Question("shape", "what shape is it?", objects[0]["shape"]))
    else:
        if len(shapes) == len(objects):
            questions += [Question("colour", f"what colour is the {o['shape']}?", o["colour"]) for o in objects]
        if len(colours) == len(objects):
            questions += [Question("shape", f"what shape is the {o['colour']} one?", o["shape"]) for o in objects]
    pairs = [f"{o['colour']} {o['shape']}" for o in objects]
    for obj, pair in zip(objects, pairs, strict=True):
        if pairs.count(pair) == 1:  # two alike have two positions: no one answer
            questions.append(Question("position", f"where is the {pair}?", obj["position"]))
    questions.append(Question("describe", DESCRIBE, describe(record)))
    return questions


def describe(record: dict) -> str:
    """The canonical description of a shapes metadata row: each object's shape before its colour (and the size of
    one object), then its position, the relation of two, or how two alike lie."""
    objects = record["objects"]
    if len(objects) == 1:
        (o,) = objects
        return f"{_noun(o['size'], o['shape'])} in {o['colour']} {POSITION_PHRASE[o['position']]}"
    a, b = objects
    if record.get("relation"):
        return f"{_noun(a['shape'])} in {a['colour']} {record['relation']} {_noun(b['shape'])} in {b['colour']}"
    side_by_side = {a["position"], b["position"]} == {"left", "right"}
    return f"two {a['shape']}s in {a['colour']} " + ("side by side" if side_by_side else "one above the other")


def has_questions(records: list[dict]) -> bool:
    """Whether a data set's metadata rows carry the objects that questions are made from (the shapes data)."""
    return bool(records) and all(questions_for(r) for r in records)


def question_texts(records: list[dict]) -> list[str]:
    """The distinct questions of the rows, sorted."""
    return sorted({q.question for r in records for q in questions_for(r)})


def _noun(*words: str) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])
