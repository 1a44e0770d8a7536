"""`RunRecord`: the run record's JSON round-trips unchanged, old and hand-made records load, and the lineage check
compares content hashes once for every caller."""

import json
import logging

import pytest

from clipcond.runs import RUN_RECORD, Lineage, RunRecord, check_same_encoder

# A decoder record as `finish_run` wrote it before the type existed: kind, args, the stage's sections, summary.
DECODER = {
    "kind": "clipcond-decoder",
    "args": {"model": "test", "train_batch_size": 8, "learning_rate": 1e-4},
    "data": {"path": "data", "split": "train", "num_samples": 240, "resolution": 32},
    "clip": {"path": "runs/clip", "content_hash": "a" * 64},
    "encoder": {"kind": "clipcond", "name": "runs/clip", "content_hash": "a" * 64},
    "conditioning": "image-embedding",
    "image_embedding": {"kind": "image-embedding", "embedding_tokens": 4, "max_noise_level": 0},
    "unet": {"preset": "test", "parameters": 1234, "content_hash": "b" * 64},
    "ema": {"decay": 0.999, "optimization_step": 4},
    "summary": {"steps": 4, "final_loss": None, "resumed_from": None},
}


def test_a_record_round_trips_to_the_same_json(tmp_path):
    (tmp_path / RUN_RECORD).write_text(json.dumps(DECODER, indent=2))
    record = RunRecord.read(tmp_path)
    assert record.kind == "clipcond-decoder" and record.args["model"] == "test" and record.summary["steps"] == 4
    assert list(record.sections) == ["data", "clip", "encoder", "conditioning", "image_embedding", "unet", "ema"]
    assert record.to_dict() == DECODER and list(record.to_dict()) == list(DECODER)  # the same keys, in order
    out = tmp_path / "again"
    out.mkdir()
    record.write(out)
    assert (out / RUN_RECORD).read_text() == (tmp_path / RUN_RECORD).read_text() + "\n"
    assert RunRecord.read(out) == record


def test_typed_accessors(tmp_path):
    record = RunRecord.from_dict(DECODER)
    assert record.clip_path == "runs/clip" and record.clip_hash == "a" * 64
    assert record.lineage == Lineage("clipcond", "runs/clip", "a" * 64)
    assert record.embedding_tokens == 4 and record.max_noise_level == 0
    assert record.parameters == 1234 and record.ema["decay"] == 0.999
    prior = RunRecord.from_dict({"kind": "clipcond-prior", "prior": {"parameters": 7}, "ema": None})
    assert prior.parameters == 7 and prior.ema is None
    with pytest.raises(ValueError, match="has no 'image_embedding' section"):
        prior.embedding_tokens  # noqa: B018
    clip = RunRecord("clipcond-clip", {"seed": 0}, {"content_hash": "c" * 64}, {"steps": 1})
    clip.write(tmp_path)
    assert RunRecord.read(tmp_path).content_hash == "c" * 64 and clip.lineage is None


def test_hand_made_and_missing_records(tmp_path):
    assert RunRecord.read_if_present(tmp_path) is None and not RunRecord.exists(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no clipcond_run.json"):
        RunRecord.read(tmp_path)
    (tmp_path / RUN_RECORD).write_text(json.dumps({"clip": {"path": "runs/clip"}}))  # as the tests write them
    record = RunRecord.read(tmp_path)
    assert record.kind is None and record.args == {} and record.clip_hash is None and record.lineage is None
    (tmp_path / RUN_RECORD).write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        RunRecord.read(tmp_path)
    (tmp_path / RUN_RECORD).write_text("[]")
    with pytest.raises(ValueError, match="not a run record object"):
        RunRecord.read(tmp_path)


def test_the_lineage_check(caplog):
    words = {"mismatch": "they differ", "missing": "nothing recorded", "fix": "pass the right one"}
    assert check_same_encoder("a", "a", allowed_by="--allow", allow=False, **words) is False
    with pytest.raises(ValueError, match="^they differ; pass the right one$"):
        check_same_encoder("a", "b", allowed_by="--allow", allow=False, **words)
    with pytest.raises(ValueError, match="^nothing recorded; pass the right one$"):
        check_same_encoder(None, "b", allowed_by="--allow", allow=False, **words)
    with caplog.at_level(logging.WARNING):
        assert check_same_encoder("a", "b", allowed_by="--allow", allow=True, **words) is True
    assert "they differ (allowed by --allow)" in caplog.text


def test_pairing_a_prior_with_an_unreadable_record_only_warns_when_allowed(tmp_path, caplog):
    from clipcond.pipelines.unclip import check_same_clip

    prior, decoder = tmp_path / "prior", tmp_path / "decoder"
    for run in (prior, decoder):
        run.mkdir()
        (run / RUN_RECORD).write_text(json.dumps(DECODER))
    (prior / RUN_RECORD).write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot check which CLIP the prior .* was trained on"):
        check_same_clip(prior, decoder)
    with caplog.at_level(logging.WARNING):
        check_same_clip(prior, decoder, allow_mismatch=True)
    assert "without a lineage check" in caplog.text


def test_a_record_without_the_encoders_hash_is_not_called_missing(tmp_path):
    from clipcond.encoders.base import check_lineage

    record = {**DECODER, "encoder": {"kind": "clipcond", "name": "runs/clip", "content_hash": None}}
    record.pop("clip")
    (tmp_path / RUN_RECORD).write_text(json.dumps(record))

    class Encoder:
        kind, name, content_hash = "clipcond", "other", "c" * 64

    with pytest.raises(ValueError) as caught:
        check_lineage(tmp_path, Encoder())
    assert "holds no" not in str(caught.value)


def test_what_a_trainer_wrote_reads_back_through_the_type(tiny_clip_run, tmp_path):
    """Not a hand-made dict: the record `clipcond train clip` wrote, read and written again unchanged."""
    record = RunRecord.read(tiny_clip_run)
    assert record.kind == "clipcond-clip" and record.summary["steps"] == 4
    assert record.args["max_train_steps"] == 4 and "data" in record.sections and "content_hash" in record.sections
    record.write(tmp_path)
    assert (tmp_path / RUN_RECORD).read_text() == (tiny_clip_run / RUN_RECORD).read_text()


def test_the_twins_weight_is_read_from_the_arguments_of_runs_before_the_section_held_it():
    twins = {"kinds": ["swap-colours"], "share": 0.17}
    assert (
        RunRecord("clip", {}, {"counterfactual_pairs": {**twins, "weight": 8.0}}).counterfactual_pairs["weight"] == 8
    )
    older = RunRecord("clip", {"counterfactual_weight": 4.0}, {"counterfactual_pairs": twins})
    assert older.counterfactual_pairs == {**twins, "weight": 4.0, "kind_weights": {}}  # weights per kind: none then
    by_kind = {**twins, "kind_weights": {"swap-colours": 16.0}}
    assert RunRecord("clip", {}, {"counterfactual_pairs": by_kind}).counterfactual_pairs["kind_weights"] == {
        "swap-colours": 16.0
    }
    assert RunRecord("clip", {}, {"counterfactual_pairs": twins}).counterfactual_pairs["weight"] == 0.0
    assert RunRecord("clip", {"counterfactual_weight": 4.0}, {}).counterfactual_pairs is None
