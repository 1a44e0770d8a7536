"""The questions of `clipcond.data.questions` answer what the shapes metadata says."""

import json

from clipcond.data.questions import QUESTION_TYPES, has_questions, question_texts, questions_for


def _records(root, split):
    return [json.loads(line) for line in (root / split / "metadata.jsonl").read_text().splitlines()]


def test_answers_agree_with_the_metadata(shapes_data):
    records = _records(shapes_data, "train") + _records(shapes_data, "test")
    seen_kinds = set()
    for record in records:
        objects = record["objects"]
        questions = questions_for(record)
        assert questions[0].question == "how many objects are there?"
        assert questions[0].answer == {1: "one", 2: "two"}[record["num_objects"]]
        for q in questions:
            seen_kinds.add(q.kind)
            if q.kind == "colour":  # the object the question names (by its shape, or the only kind there is)
                named = [o for o in objects if f"the {o['shape']}?" in q.question or "the shape?" in q.question]
                assert named and {o["colour"] for o in named} == {q.answer}
            elif q.kind == "shape":
                named = [o for o in objects if f"the {o['colour']} one?" in q.question or q.question.endswith("it?")]
                assert named and {o["shape"] for o in named} == {q.answer}
            elif q.kind == "position":
                named = [o for o in objects if q.question == f"where is the {o['colour']} {o['shape']}?"]
                assert len(named) == 1 and named[0]["position"] == q.answer
        if record["kind"] == "count":  # two alike: no position question has one answer
            assert "position" not in {q.kind for q in questions}
        if record["kind"] == "single":
            assert [q.kind for q in questions] == ["count", "colour", "shape", "position", "describe"]
            o = objects[0]
            assert questions[-1].answer.startswith(f"a {o['size']} {o['shape']} in {o['colour']} ")
            assert questions[-1].answer.endswith(o["position"])
        if record["kind"] == "relation":
            a, b = objects
            description = f"{a['shape']} in {a['colour']} {record['relation']} a"
            assert description in questions[-1].answer and questions[-1].answer.endswith(
                f"{b['shape']} in {b['colour']}"
            )
        if record["kind"] == "count":
            assert questions[-1].answer.startswith(f"two {objects[0]['shape']}s in {objects[0]['colour']} ")
    assert seen_kinds == set(QUESTION_TYPES)
    assert has_questions(records)
    assert "how many objects are there?" in question_texts(records)


def test_rows_without_objects_have_no_questions():
    assert questions_for({"text": "a cat"}) == []
    assert not has_questions([{"text": "a cat"}])
