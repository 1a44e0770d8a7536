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
"""

from __future__ import annotations

from dataclasses import dataclass

QUESTION_TYPES = ("count", "colour", "shape", "position")
COUNT_WORDS = {1: "one", 2: "two"}


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
    return questions


def has_questions(records: list[dict]) -> bool:
    """Whether a data set's metadata rows carry the objects that questions are made from (the shapes data)."""
    return bool(records) and all(questions_for(r) for r in records)


def question_texts(records: list[dict]) -> list[str]:
    """The distinct questions of the rows, sorted."""
    return sorted({q.question for r in records for q in questions_for(r)})
