"""One attribute judge for every evaluation test: trained once per session into a shared cache folder."""

import pytest

from clipcond.evaluation.judge import JudgeTrainingConfig, load_or_train_judge

# A smaller budget than the default (7200 renders x 6 epochs): about a third of the steps, and still ~100% on clean
# one-object renders and ~95% on the outcome of renders of every kind.
TEST_JUDGE_CONFIG = JudgeTrainingConfig(num_renders=3600, epochs=4)


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "judge_cache"


@pytest.fixture(scope="session")
def judge_config():
    return TEST_JUDGE_CONFIG


@pytest.fixture(scope="session")
def judge(judge_cache, judge_config):
    return load_or_train_judge(32, cache_dir=judge_cache, config=judge_config)
