"""Fine-tuning and evaluating on measured ST sections, as jobs.

Both front doors (the CLI's ``train``/``evaluate``, the fine-tuning widget) hand over
loaded sections and their choices; the patches, the split and the loop are done here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

from ..errors import Cancelled, M2ORTError
from ..progress import Job, Progress
from . import checks
from .models import is_baseline, model_for_training, resolve_model, trained_on
from .requests import EvaluateRequest, FineTuneRequest


def split_sections(cached: Sequence, val: str = "blocks", seed: int = 0):
    """(training sets, validation sets): spatial blocks, held-out section(s), or none."""
    from ..training import spatial_block_split

    val = (val or "blocks").strip()
    if val == "none":
        return list(cached), []
    if val == "blocks":
        train_sets, val_sets = [], []
        for s in cached:
            mask = spatial_block_split(s.centers_um, seed=seed)
            train_sets.append(s.subset(~mask, ":train"))
            val_sets.append(s.subset(mask, ":val"))
        return train_sets, val_sets
    names = {v.strip() for v in val.split(",")}
    val_sets = [s for s in cached if s.name in names]
    train_sets = [s for s in cached if s.name not in names]
    if not val_sets:
        raise M2ORTError(f"--val {val!r}: no loaded section has that name ({', '.join(s.name for s in cached)}).")
    if not train_sets:
        raise M2ORTError("All sections are held out for validation: keep at least one for training.")
    return train_sets, val_sets


def _check_sections(sections) -> None:
    if not sections:
        raise M2ORTError("No ST section given: load measured spots (counts and spot positions) first.")


def fine_tune(request: FineTuneRequest, should_stop: Optional[Callable[[], bool]] = None) -> Job:
    """Train ``request.model`` on ``request.sections`` (a job returning a
    ``training.TrainResult``; its ``checkpoint`` is ``request.out_path`` unless the model
    is a CNN baseline). Stopping during patch sampling raises ``errors.Cancelled``;
    stopping during training keeps the best model so far."""
    from ..training import prepare_section, train

    _check_sections(request.sections)
    checks.train_config(request.config)
    checks.mpp(request.train_mpp, "Training resolution (µm/px)")
    yield Progress("setup", 0, 1, "loading the model")
    model, card = model_for_training(
        request.model,
        request.sections,
        request.genes,
        request.train_mpp,
        request.tied_kv,
        request.panel_rule,
        drop_path=request.config.drop_path,
    )
    cached = []
    for sec in request.sections:
        cached.append((yield from prepare_section(sec, card.genes, card.mpp, cache_dir=request.cache_dir)))
        if should_stop is not None and should_stop():
            raise Cancelled()
    train_sets, val_sets = split_sections(cached, request.val, seed=request.config.seed)
    out_path = None if is_baseline(card.variant) else request.out_path
    return (
        yield from train(model, card, train_sets, val_sets, request.config, out_path=out_path, should_stop=should_stop)
    )


def evaluate(request: EvaluateRequest) -> Job[dict]:
    """Metrics of a trained model on the sections (a job returning the metrics dict, with
    ``sections`` and ``model`` added)."""
    from ..devices import resolve_device
    from ..evaluation import evaluate_cached
    from ..training import prepare_section
    from ..tta import OUTPUT_RULE

    _check_sections(request.sections)
    checks.inference_options(request)
    tta, smooth_um = request.tta, request.smooth_um
    yield Progress("setup", 0, 1, "loading the model")
    dev = resolve_device(request.device)
    model, card = resolve_model(request.model, device=str(dev))
    seen = trained_on(card, [s.name for s in request.sections])
    if seen:
        warnings.warn(
            f"{', '.join(seen)} {'is' if len(seen) == 1 else 'are'} in the model's training data "
            f"({card.training_data}): the score there measures the fit, not accuracy on unseen tissue.",
            stacklevel=2,
        )
    cached = []
    for sec in request.sections:
        cached.append(
            (yield from prepare_section(sec, card.genes, card.mpp, cache_dir=request.cache_dir, allow_missing=True))
        )
    yield Progress("evaluate", 0, 1, f"{sum(len(c) for c in cached)} spots")
    res = evaluate_cached(
        model,
        cached,
        getattr(card, "target_mean", None),
        device=dev,
        precision=request.precision,
        batch_size=request.batch_size,
        tta=tta,
        smooth_um=smooth_um,
    )
    yield Progress("evaluate", 1, 1, "done")
    res["output_rule"] = OUTPUT_RULE
    res["in_training_data"] = seen
    res["sections"] = [s.name for s in request.sections]
    res["model"] = str(request.model) if isinstance(request.model, (str, os.PathLike)) else card.variant
    return res
