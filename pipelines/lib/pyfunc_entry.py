"""MLflow models-from-code entry: loading the pyfunc model runs this file (no pickled objects)."""
import mlflow

from pipelines.lib.mlflow_model import DRCSegmenter

mlflow.models.set_model(DRCSegmenter())
