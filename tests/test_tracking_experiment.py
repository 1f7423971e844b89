"""Experiments the pipeline creates open in MLflow's model-training view (issue 13 item 2)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_id


def test_created_experiments_are_marked_as_model_development(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = experiment_id("dnlan-kind-test", uri)
    assert EXPERIMENT_KIND == "custom_model_development"
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert experiment_id("dnlan-kind-test", uri) == exp_id  # found again, not created twice
    # someone else's experiment is used as it is: the pipeline does not retag it
    theirs = client.create_experiment("theirs", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id("theirs", uri) == theirs
    assert client.get_experiment(theirs).tags[EXPERIMENT_KIND_TAG] == "genai_development"
