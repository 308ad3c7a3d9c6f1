"""What the pipeline expects of a cluster: the Secrets (names and keys) and the training pods' size.

The pipeline's train task (one pod, :mod:`pipelines.top_tagging`) and the TrainJob's nodes
(:mod:`toptagger.deploy.trainjob.render`) take the same values from here; the Secrets are
created once per namespace (docs/pipeline.md).
"""

from __future__ import annotations

S3_SECRET = "top-tagger-s3"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
S3_OPTIONAL_KEYS = {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"}
MLFLOW_SECRET = "top-tagger-mlflow"
MLFLOW_KEYS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
MLFLOW_OPTIONAL_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}

# CPU and memory requested by a training pod (the train task, or each node of a TrainJob).
TRAIN_CPU, TRAIN_MEMORY = "4", "32G"
