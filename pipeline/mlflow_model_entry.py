"""Entry file of the logged MLflow Model ("models from code"): MLflow runs this file to get the
model object, so the registered model holds no pickled Python (the weights themselves are read
with ``weights_only=True``). Not imported by the pipeline."""

import mlflow

from pipeline.mlflow_model import DnlanModel

mlflow.models.set_model(DnlanModel())
