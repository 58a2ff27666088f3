"""Training and fine-tuning as a stoppable generator (see ``progress``).

Patches are sampled once per section and kept in memory as uint8 (150 kB per spot), so
an epoch costs only the model.  Validation uses held-out sections or held-out spatial
blocks, never random spots: neighbouring spots share tissue and would leak.  The best
epoch (validation PCC-gene) is written atomically as safetensors with its model card, so
stopping at any step leaves the best checkpoint intact.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .augment import GEOMETRIES, STAINS, augment_level1, dihedral_level1, hed_jitter
from .devices import resolve_device, resolve_precision
from .errors import M2ORTError
from .evaluation import evaluate_sections
from .losses import CountLoss
from .progress import Job, Progress


@dataclass
class CachedSection:
    """One section's patches and targets on a fixed gene panel."""

    name: str
    level1: np.ndarray  # (N, 224, 224, 3) uint8
    y: np.ndarray  # (N, G) float32 normalised targets
    centers_um: np.ndarray  # (N, 2)
    genes: list
    genes_missing: list = field(default_factory=list)
    counts: Optional[np.ndarray] = None  # (N, G) float32 raw panel counts (count losses)
    depth: Optional[np.ndarray] = None  # (N,) float32 panel counts per spot

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, mask: np.ndarray, suffix: str = "") -> CachedSection:
        return CachedSection(
            self.name + suffix,
            self.level1[mask],
            self.y[mask],
            self.centers_um[mask],
            self.genes,
            self.genes_missing,
            None if self.counts is None else self.counts[mask],
            None if self.depth is None else self.depth[mask],
        )


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-4
    batch_size: int = 96
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "cosine" (per step, to 0 at the last step)
    warmup_epochs: float = 0.0
    mode: str = "full"  # "full" | "head"
    augment: bool = True
    rotate: bool = True  # legacy switch: False means geometry "flips"
    geometry: str = "rotate"  # "rotate" (spec: any angle, white fill) | "dihedral" | "flips" | "none"
    color_jitter: float = 0.0
    stain: str = "rgb"  # colour augmentation of amplitude color_jitter: "rgb" gains | "hed" stain OD
    loss: str = "mse"  # see losses.LOSSES
    depth_k: float = 1000.0  # mse_depth: weight depth / (depth + k)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0 = off)
    # Stochastic depth of a new model: it is built with it (pipelines.model_for_training),
    # so it is part of the recipe here, where the card records the recipe. A checkpoint
    # keeps the structure it was saved with.
    drop_path: float = 0.0
    target_norm: str = "none"  # see TARGET_NORMS
    # Gaussian sigma (µm) over each training section's own training spots, applied to the
    # targets before the loss (0 = off); see smoothed_targets.
    target_smooth_um: float = 0.0
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 1


TARGET_NORMS = {
    "none": "targets as measured (log1p panel-CPM)",
    "section_center": "each training section's mean profile moved to the mean over sections",
    "section_z": "each gene standardised within each training section, mapped back to the mean over "
    "sections of its mean and spread; the loss weighs every gene equally",
}


def section_normalized_targets(sets: Sequence[CachedSection], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Training targets with the between-section differences taken out, and per-gene loss scales.

    PCC-gene is measured within one section, so a section's mean profile (its depth,
    its batch, B4's 19x shallower library) says nothing about the score, yet plain MSE
    spends the model on it: the easiest way to lower the loss is to recognise which
    section a patch comes from (stain, scanner) and predict that section's mean. Moving
    every section to a common mean profile leaves only within-section variation to
    learn. ``section_z`` also equalises the spread per section (B4's noise no longer
    outweighs the deep sections) and weighs genes equally, as PCC-gene does. The targets
    stay on the log1p-CPM scale, so the model's output keeps its meaning.
    """
    ys = [np.asarray(s.y, dtype=np.float64) for s in sets]
    n_genes = ys[0].shape[1]
    if mode == "none":
        return np.concatenate(ys).astype(np.float32), np.ones(n_genes, np.float32)
    mus = np.stack([y.mean(0) for y in ys])
    target_mu = mus.mean(0)
    if mode == "section_center":
        out = [y - mu + target_mu for y, mu in zip(ys, mus)]
        return np.concatenate(out).astype(np.float32), np.ones(n_genes, np.float32)
    sds = np.stack([y.std(0) for y in ys])
    target_sd = np.maximum(sds.mean(0), 1e-3)
    out = []
    for y, mu, sd in zip(ys, mus, sds):
        z = np.where(sd > 1e-6, (y - mu) / np.maximum(sd, 1e-6), 0.0)
        out.append(target_mu + z * target_sd)
    return np.concatenate(out).astype(np.float32), target_sd.astype(np.float32)


def check_target_options(cfg: TrainConfig) -> None:
    """Refuses target options that do not fit together, before any data is read."""
    if cfg.target_norm not in TARGET_NORMS:
        raise M2ORTError(f"Unknown target normalisation {cfg.target_norm!r}: use one of {', '.join(TARGET_NORMS)}.")
    if cfg.target_norm != "none" and cfg.loss in ("poisson", "nb"):
        raise M2ORTError(
            f"Target normalisation {cfg.target_norm!r} changes the log1p-CPM targets, and the {cfg.loss!r} loss "
            "models the raw counts: use it with 'mse' or 'mse_depth', or set the normalisation to 'none'."
        )


def smoothed_targets(sets: Sequence[CachedSection], sigma_um: float) -> list[CachedSection]:
    """Training sections whose targets are averaged over neighbouring training spots.

    A spot's log1p-CPM is its expression plus counting noise that its neighbours do not
    share (B4's spots carry a few hundred counts). Averaging over neighbours of the
    same section trades a little spatial detail for much less noise in what the loss
    chases. Only training spots take part, so held-out blocks never leak in; validation
    and every reported metric still use the measured targets.
    """
    import dataclasses

    from .tta import smooth

    if not sigma_um:
        return list(sets)
    return [dataclasses.replace(s, y=smooth(s.y, s.centers_um, sigma_um)) for s in sets]


@dataclass
class TrainResult:
    model: torch.nn.Module
    card: object
    history: list
    best_epoch: int
    best_metrics: dict
    checkpoint: Optional[Path]
    stopped: bool
    epochs_done: int
    seconds: float
    fit: dict = field(default_factory=dict)  # per training section: PCC-gene on its training spots


# ---------------------------------------------------------------- data preparation


def section_centers_um(section) -> np.ndarray:
    return np.asarray(section.adata.obsm["spatial"], dtype=float)[:, :2] * float(section.mpp)


def prepare_section(
    section, genes: Sequence[str], mpp: float, cache_dir: Optional[Path] = None, allow_missing: bool = False
) -> Job[CachedSection]:
    """Sample each spot's patch once and compute panel-normalised targets.

    Data that do not fit the panel stop here, before any patch is read: no panel gene
    found, more than half missing (even with ``allow_missing``), or more than half of the
    spots without panel counts.  A cache file in ``cache_dir`` is used only when its
    header, size and checksum are right; otherwise it is named in a
    ``patch_cache.PatchCacheWarning``, deleted and rebuilt.
    """
    from .io.slides import open_slide
    from .io.st.validate import check_most_kept, check_panel_genes
    from .patch_cache import load_patches, save_patches
    from .patches import sample_spots
    from .targets import normalize_counts

    adata = section.adata
    where = _section_source(section)
    var = list(map(str, adata.var_names))
    index = {g: i for i, g in enumerate(var)}
    missing = [g for g in genes if g not in index]
    check_panel_genes(where, var, adata.var, list(genes), missing, allow_missing)
    counts = _dense(adata.X)
    panel = np.zeros((counts.shape[0], len(genes)), dtype=np.float32)
    for j, g in enumerate(genes):
        if g in index:
            panel[:, j] = counts[:, index[g]]
    y, keep = normalize_counts(panel, np.arange(len(genes)))
    y = np.asarray(y, dtype=np.float32)
    if y.shape[0] != int(np.sum(keep)):
        y = y[keep]
    check_most_kept(
        int((~keep).sum()),
        len(keep),
        where,
        f"spots have no counts in any of the {len(genes)} panel genes",
        "the panel does not fit this data (another tissue or species, or gene names that only partly match)",
    )
    if not np.all(keep):
        warnings.warn(f"{section.name}: {int((~keep).sum())} spots with no panel counts were dropped.", stacklevel=2)
    panel_counts = panel[keep].astype(np.float32)
    depth = panel_counts.sum(axis=1)
    centers = section_centers_um(section)[keep]
    if section.image_path is None:
        raise M2ORTError(f"{section.name}: no image is paired with these spots; give the H&E image.")
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha1()
        st = Path(section.image_path).stat()
        key.update(f"{Path(section.image_path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{section.mpp}|{mpp}".encode())
        key.update(np.ascontiguousarray(centers).tobytes())
        cache_file = Path(cache_dir) / f"{section.name}-{key.hexdigest()[:16]}.npy"
        level1 = load_patches(cache_file, len(centers))
        if level1 is not None:
            yield Progress("patches", len(centers), len(centers), f"{section.name}: cached")
            return CachedSection(section.name, level1, y, centers, list(genes), missing, panel_counts, depth)
    slide = open_slide(section.image_path, mpp=section.mpp)
    n = len(centers)
    level1 = np.empty((n, 224, 224, 3), dtype=np.uint8)
    step = 64
    for i in range(0, n, step):
        level1[i : i + step] = sample_spots(slide, centers[i : i + step], mpp).level1
        yield Progress("patches", min(n, i + step), n, f"{section.name}: sampling patches")
    slide.close()
    if cache_file is not None:
        save_patches(cache_file, level1)
    return CachedSection(section.name, level1, y, centers, list(genes), missing, panel_counts, depth)


def _section_source(section) -> str:
    """The user's file behind a section (for messages), with the section's name."""
    meta = section.adata.uns.get("spatial", {}).get(section.name, {}).get("metadata", {})
    source = str(meta.get("source") or "")
    return f"{source} (section {section.name})" if source else str(section.name)


def _dense(x) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float32)


def spatial_block_split(
    centers_um: np.ndarray, block_um: float = 1000.0, val_fraction: float = 0.2, seed: int = 0
) -> np.ndarray:
    """Validation mask made of whole square blocks of tissue (no neighbour leakage)."""
    if len(centers_um) < 10:
        raise M2ORTError(
            f"Only {len(centers_um)} spots: too few to hold out spatial blocks for validation. "
            "Add another section for validation."
        )
    bx = np.floor(centers_um[:, 0] / block_um).astype(np.int64)
    by = np.floor(centers_um[:, 1] / block_um).astype(np.int64)
    blocks = np.unique(np.stack([bx, by], 1), axis=0)
    rng = np.random.default_rng(seed)
    rng.shuffle(blocks)
    val = np.zeros(len(centers_um), dtype=bool)
    target = val_fraction * len(centers_um)
    for b in blocks:
        if val.sum() >= target:
            break
        val |= (bx == b[0]) & (by == b[1])
    if val.all() or not val.any():
        raise M2ORTError("Could not split the spots into training and validation blocks; use a held-out section.")
    return val


# ---------------------------------------------------------------- batches


def _inputs(
    level1_uint8: np.ndarray,
    dev,
    augment: bool,
    rotate,
    jitter: float,
    gen: Optional[torch.Generator],
    stain: str = "rgb",
):
    """``rotate``: a geometry name (see TrainConfig.geometry) or the legacy bool."""
    geometry = rotate if isinstance(rotate, str) else ("rotate" if rotate else "flips")
    x = torch.from_numpy(level1_uint8).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
    if augment:
        if geometry == "rotate":
            x = augment_level1(x, gen, rotate=True)
        elif geometry in ("dihedral", "flips"):
            x = dihedral_level1(x, gen, turns=geometry == "dihedral")
        if jitter > 0 and stain == "hed":
            x = hed_jitter(x, jitter, gen)
        elif jitter > 0 and stain == "rgb":
            b = x.shape[0]
            gain = 1.0 + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1).to(dev) * jitter
            bias = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1).to(dev) * jitter * 0.5
            x = (x * gain + bias).clamp_(0.0, 1.0)
    return x.contiguous(), F.avg_pool2d(x, 2).contiguous(), F.avg_pool2d(x, 4).contiguous()


def train(
    model: torch.nn.Module,
    card,
    train_sets: Sequence[CachedSection],
    val_sets: Sequence[CachedSection] = (),
    config: Optional[TrainConfig] = None,
    out_path: Optional[Path] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    start_epoch: int = 0,
) -> Job[TrainResult]:
    from .model.weights import save_checkpoint

    cfg = config or TrainConfig()
    if not train_sets or sum(len(s) for s in train_sets) == 0:
        raise M2ORTError("There are no training spots: load at least one section with spots on the slide.")
    genes = list(card.genes)
    for s in list(train_sets) + list(val_sets):
        if list(s.genes) != genes:
            raise M2ORTError(f"{s.name}: its gene panel differs from the model's; prepare it with the model's genes.")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, dev)
    if amp == torch.float16 and str(cfg.precision).lower() == "auto":
        amp = None  # "auto" on MPS: this loop has no loss scaling, and fp16 gradients underflow
    model = model.to(dev)
    level1 = np.concatenate([s.level1 for s in train_sets])
    check_target_options(cfg)
    y_np, gene_scale = section_normalized_targets(smoothed_targets(train_sets, cfg.target_smooth_um), cfg.target_norm)
    y = torch.from_numpy(y_np)
    geometry = cfg.geometry if cfg.rotate or cfg.geometry != "rotate" else "flips"
    if geometry not in GEOMETRIES:
        raise M2ORTError(f"Unknown augmentation geometry {cfg.geometry!r}: use one of {', '.join(GEOMETRIES)}.")
    if cfg.stain not in STAINS:
        raise M2ORTError(f"Unknown stain augmentation {cfg.stain!r}: use one of {', '.join(STAINS)}.")
    criterion = CountLoss(cfg.loss, len(genes), cfg.depth_k).to(dev)
    counts = depth = None
    if criterion.needs_counts:
        if any(s.counts is None for s in train_sets):
            raise M2ORTError(f"The {cfg.loss!r} loss needs raw panel counts; prepare the sections again.")
        counts = torch.from_numpy(np.concatenate([s.counts for s in train_sets]).astype(np.float32))
        depth = torch.from_numpy(np.concatenate([s.depth for s in train_sets]).astype(np.float32))
    inv_scale = None if cfg.target_norm != "section_z" else torch.from_numpy(1.0 / gene_scale).to(dev)
    train_mean = y.mean(0).numpy()
    if card.target_mean is None:
        # A new head starts at the training mean profile rather than at zero: targets are
        # log1p-CPM (about 5–10), and learning that offset from zero wastes epochs.
        _init_head_bias(model, train_mean)
    card.target_mean = [float(v) for v in train_mean]
    if cfg.mode == "head":
        head = _head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    elif cfg.mode != "full":
        raise M2ORTError(f"Unknown fine-tuning mode {cfg.mode!r}: use 'full' or 'head'.")
    params = [p for p in model.parameters() if p.requires_grad] + list(criterion.parameters())
    # AdamW: with weight_decay 0 (the spec's default) it is exactly Adam; with decay it
    # is the decoupled form transformers are tuned with.
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(y)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
    history: list[dict] = []
    best_score, best_epoch, best_metrics, best_state = -np.inf, -1, {}, None
    ema = _Ema(model, cfg.ema) if cfg.ema > 0 else None
    stopped = False
    t0 = time.perf_counter()
    step = 0
    epoch = start_epoch
    yield Progress("train", 0, total, f"{n} training spots, {sum(len(s) for s in val_sets)} validation")
    for e in range(cfg.epochs):
        epoch = start_epoch + e + 1
        model.train()
        if cfg.mode == "head":
            model.eval()  # keep frozen parts deterministic (no dropout)
        perm = rng.permutation(n)
        losses = []
        te = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = np.sort(perm[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            if len(idx) == 0:
                continue
            l1, l2, l3 = _inputs(level1[idx], dev, cfg.augment, geometry, cfg.color_jitter, gen, cfg.stain)
            target = y[idx].to(dev)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                pred = model(l1, l2, l3)
            if inv_scale is not None:  # equal weight per gene: MSE of the standardised values
                pred, target = pred.float() * inv_scale, target * inv_scale
            loss = criterion(
                pred,
                target,
                None if counts is None else counts[idx].to(dev),
                None if depth is None else depth[idx].to(dev),
            )
            if not torch.isfinite(loss):
                raise M2ORTError("The training loss became NaN/inf: lower the learning rate.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            losses.append(loss.item())
            step += 1
            # the bar shows the epoch's running mean: the same definition as the summary
            yield Progress(
                "train",
                step,
                total,
                f"epoch {epoch} loss {np.mean(losses):.4f}",
                data={"epoch": epoch, "step": step, "loss": float(np.mean(losses))},
            )
            if should_stop is not None and should_stop():
                stopped = True
                break
        if stopped:
            break
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "epoch_seconds": time.perf_counter() - te,
            "lr": float(opt.param_groups[0]["lr"]),
        }
        if ema is not None:
            ema.swap_in(model)  # evaluate and save the averaged weights
        if val_sets and (e + 1) % cfg.eval_every == 0:
            metrics = evaluate_sections(model, val_sets, train_mean, dev, cfg.precision)
            record["val"] = metrics
            score = metrics["pcc_gene_mean"]
            if score is not None and np.isfinite(score) and score > best_score:
                best_score, best_epoch, best_metrics = score, epoch, record["val"]
                best_state = copy.deepcopy(model.state_dict())
                if out_path is not None:
                    card.metrics = {
                        "validation": best_metrics,
                        "best_epoch": best_epoch,
                        "train_config": _config_record(cfg),
                    }
                    save_checkpoint(model, card, out_path)
        elif not val_sets:
            best_epoch, best_state = epoch, None
            if out_path is not None:
                card.metrics = {"validation": None, "epochs": epoch, "train_config": _config_record(cfg)}
                save_checkpoint(model, card, out_path)
            best_state = copy.deepcopy(model.state_dict())
        if ema is not None:
            ema.swap_out(model)
        history.append(record)
        yield Progress("epoch", e + 1, cfg.epochs, _epoch_message(record), data=dict(record))
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    fit = {}
    if best_state is not None and not stopped:
        yield Progress("fit", 0, 1, "measuring the fit on the training spots")
        fit = evaluate_sections(model, train_sets, train_mean, dev, cfg.precision)
        card.metrics = dict(card.metrics or {}, fit=fit)
        if out_path is not None and Path(out_path).exists():
            save_checkpoint(model, card, out_path)
    return TrainResult(
        model,
        card,
        history,
        best_epoch,
        best_metrics,
        Path(out_path) if out_path is not None and Path(out_path).exists() else None,
        stopped,
        epoch if not stopped else epoch - 1,
        time.perf_counter() - t0,
        fit,
    )


class _Ema:
    """Exponential moving average of the weights; evaluated and saved in their place.

    A few hundred spots give a few hundred noisy steps; the average of the last ones
    generalises better than the last one alone."""

    def __init__(self, model, decay: float):
        if not 0 < decay < 1:
            raise M2ORTError(f"EMA decay {decay} must be between 0 and 1 (e.g. 0.98).")
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.backup = None

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def swap_in(self, model):
        self.backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)

    def swap_out(self, model):
        if self.backup is not None:
            model.load_state_dict(self.backup)
            self.backup = None


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr at each optimiser step: linear warmup, then constant or cosine.

    From-scratch transformers on a few hundred spots get only a few hundred steps; a
    warmup keeps the first ones from wrecking the init and a cosine tail lets the last
    epochs settle instead of bouncing at the full rate.
    """
    if cfg.schedule not in ("constant", "cosine"):
        raise M2ORTError(f"Unknown learning-rate schedule {cfg.schedule!r}: use 'constant' or 'cosine'.")
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(max(0.0, cfg.warmup_epochs) * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def _config_record(cfg: TrainConfig) -> dict:
    """The recipe, stored in the checkpoint's card so a model says how it was trained."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k not in ("device", "eval_every")}


def _epoch_message(record: dict) -> str:
    msg = f"epoch {record['epoch']}: loss {record['train_loss']:.4f}"
    if "val" in record:
        v = record["val"]
        msg += f", val PCC-gene {_fmt(v['pcc_gene_mean'])}, PCC-spot {_fmt(v['pcc_spot_mean'])}"
    return msg


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _init_head_bias(model, mean: np.ndarray) -> None:
    try:
        head = _head(model)
    except M2ORTError:
        return
    bias = getattr(head, "bias", None)
    if isinstance(bias, torch.nn.Parameter) and bias.shape == (len(mean),):
        with torch.no_grad():
            bias.copy_(torch.as_tensor(mean, dtype=bias.dtype))


def _head(model):
    for name in ("head", "fc", "classifier"):
        m = getattr(model, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    if hasattr(model, "backbone"):
        return _head(model.backbone)
    raise M2ORTError("This model has no recognisable head to fine-tune alone; use mode 'full'.")
