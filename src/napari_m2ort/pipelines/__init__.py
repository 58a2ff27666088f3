"""The use-case layer: what napari-m2ort does, called by every front door.

The CLI, the widgets and the cohort runner (``distributed``) fill a typed request and
run one of these jobs (generators yielding ``progress.Progress`` and returning their
result; ``progress.run_to_end`` runs one synchronously). None of the front doors builds
a use case itself, and none imports another.

* ``predict_slide(PredictRequest)`` -> ``SlidePrediction`` (``plan_slide`` + ``run_plan``)
* ``fine_tune(FineTuneRequest)`` -> ``training.TrainResult``
* ``evaluate(EvaluateRequest)`` -> metrics dict
* ``spots_for_slide``, ``resolve_model`` (one reader of model specs), ``model_for_training``
"""

from .models import (
    BUNDLED,
    CNN_BACKBONES,
    DEFAULT_TRAIN_MPP,
    build_model,
    checkpoint_path,
    is_baseline,
    is_variant,
    model_for_training,
    new_card,
    read_model_card,
    remember_model,
    resolve_genes,
    resolve_model,
    trained_on,
)
from .outputs import check_prediction_output, prediction_anndata, write_json, write_prediction
from .predict import (
    estimate_spots,
    merge_layouts,
    parse_region,
    plan_slide,
    predict_slide,
    predict_spots,
    run_plan,
    spots_for_slide,
)
from .requests import (
    EvaluateRequest,
    FineTuneRequest,
    ModelSpec,
    PredictionPlan,
    PredictRequest,
    SlidePrediction,
)
from .train import evaluate, fine_tune, split_sections

__all__ = [
    "BUNDLED",
    "CNN_BACKBONES",
    "DEFAULT_TRAIN_MPP",
    "EvaluateRequest",
    "FineTuneRequest",
    "ModelSpec",
    "PredictRequest",
    "PredictionPlan",
    "SlidePrediction",
    "build_model",
    "check_prediction_output",
    "estimate_spots",
    "prediction_anndata",
    "write_json",
    "write_prediction",
    "checkpoint_path",
    "evaluate",
    "fine_tune",
    "is_baseline",
    "is_variant",
    "merge_layouts",
    "model_for_training",
    "new_card",
    "parse_region",
    "plan_slide",
    "predict_slide",
    "predict_spots",
    "read_model_card",
    "remember_model",
    "resolve_genes",
    "resolve_model",
    "run_plan",
    "spots_for_slide",
    "split_sections",
    "trained_on",
]
