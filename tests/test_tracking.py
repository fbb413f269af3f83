"""MLflow names: every metric and parameter name forgetless logs passes MLflow's own checks,
including ones built from a file path (a compare target or task given as a path)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_metric_name, _validate_param_name

from forgetless.tracking import mlflow_key

PATHS = ["/tmp/data.jsonl/exact_match", "lambda_0.5//tmp/d.jsonl/exact_match",
         "../d.jsonl/acc", "./d.jsonl/acc", "..d/acc", "a/", "", "~/tâche.yaml/acc",
         "C:\\data\\x.csv/exact_match", "x" * 300 + "/acc"]


@pytest.mark.parametrize("name", PATHS)
def test_path_like_names_become_valid(name):
    key = mlflow_key(name)
    _validate_metric_name(key)
    _validate_param_name(key)
    assert len(key) <= 250


def test_valid_names_stay_as_they_are():
    for name in ("heldout/acc", "lambda_0.5/heldout/acc", "train/loss", "train.learning_rate",
                 "count_letters/exact_match", "drift/kl"):
        assert mlflow_key(name) == name
    assert mlflow_key("/a/x.jsonl/acc") == "a/x.jsonl/acc"
    long_a, long_b = mlflow_key("a" * 300 + "/acc"), mlflow_key("a" * 300 + "/nll")
    assert long_a != long_b  # a cut name keeps a digest of the whole


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_becomes_a_valid_name(name):
    key = mlflow_key(name)
    _validate_metric_name(key)
    _validate_param_name(key)
    assert len(key) <= 250
