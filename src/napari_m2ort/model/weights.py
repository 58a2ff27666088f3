"""Trained M2ORT weights on disk: safetensors plus a model card.

A checkpoint is one ``.safetensors`` file. Its string metadata holds the model card (JSON):
which timm variant, which genes in which order, what target the outputs are (so they can be
read back as expression), the training resolution in µm/px and the field of view in µm
(so a slide from another scanner is resampled to match), and how the model was evaluated.
safetensors holds no code, so a downloaded checkpoint cannot run anything when loaded
(unlike pickle), and the card travels inside the very file it describes.

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a crash
or a full disk never leaves a half-written checkpoint under the real name. A SHA-256 of
the tensor bytes is stored too: safetensors checks the header but not the data, and a
flipped bit in a weight would otherwise load silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import M2ORTError
from . import m2ort as _arch
from .m2ort import M2ORT, VARIANTS

__all__ = [
    "BUNDLED_PATH",
    "DEFAULT_TARGET",
    "GeneCheck",
    "ModelCard",
    "check_genes",
    "load_bundled",
    "load_checkpoint",
    "read_card",
    "read_digest",
    "replace_head",
    "save_checkpoint",
]

BUNDLED_PATH = Path(__file__).parent.parent / "data" / "m2ort_small_her2st.safetensors"
DEFAULT_TARGET = "log1p(counts * 1e6 / panel_total)"

_CARD_KEY = "napari_m2ort.card"
_FORMAT_KEY = "napari_m2ort.format"
_FORMAT = "1"
_SHA_KEY = "napari_m2ort.tensor_sha256"
_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def package_version() -> str:
    from .. import __version__

    return __version__


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelCard:
    """What a checkpoint is, so predictions can be used and judged correctly.

    ``genes`` is the output order of the head. ``target`` says what one output means
    (the default: log1p of counts per million of the panel total). ``mpp`` is the
    training resolution; ``fov_um`` = ``patch_px`` × ``mpp`` is the side of the field of
    view one spot sees. ``target_mean`` (per gene, training set) is the trivial
    baseline every metric should be compared with. Unknown keys read from a newer card
    are kept in ``extra`` so a round trip loses nothing.
    """

    variant: str
    genes: list[str]
    mpp: float
    target: str = DEFAULT_TARGET
    fov_um: float | None = None
    patch_px: int = 224
    tied_kv: bool = False
    training_data: str = ""
    gene_panel_rule: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = field(default_factory=package_version)
    created: str = field(default_factory=utc_now)
    notes: str = ""
    target_mean: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        self.mpp = float(self.mpp)
        if self.fov_um is None:
            self.fov_um = self.patch_px * self.mpp
        if self.target_mean is not None:
            self.target_mean = [float(v) for v in self.target_mean]
        self.validate()

    def validate(self) -> None:
        """Raise M2ORTError if the card contradicts itself."""
        if not self.genes:
            raise M2ORTError("The model card lists no genes; a card needs the head's gene order.")
        dupes = [g for g, n in Counter(self.genes).items() if n > 1]
        if dupes:
            raise M2ORTError(f"The model card lists genes more than once: {_short(dupes)}.")
        if not self.mpp > 0:
            raise M2ORTError(f"The model card's mpp must be a positive µm/px, got {self.mpp}.")
        if self.target_mean is not None and len(self.target_mean) != len(self.genes):
            raise M2ORTError(
                f"The model card's target_mean has {len(self.target_mean)} values but it lists {len(self.genes)} genes."
            )

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def to_json(self) -> str:
        data = asdict(self)
        extra = data.pop("extra")
        return json.dumps({**extra, **data}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise M2ORTError(f"The model card is not valid JSON ({exc}).") from None
        if not isinstance(data, dict):
            raise M2ORTError("The model card is not a JSON object.")
        missing = [k for k in ("variant", "genes", "mpp") if k not in data]
        if missing:
            raise M2ORTError(f"The model card lacks required fields: {', '.join(missing)}.")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except (TypeError, ValueError) as exc:
            raise M2ORTError(f"The model card has a field of the wrong type ({exc}).") from None


@dataclass
class GeneCheck:
    """How a data set's genes compare with a card's panel (card order kept)."""

    missing: list[str]  # in the card, not in the data
    extra: list[str]  # in the data, not in the card
    n_common: int

    @property
    def ok(self) -> bool:
        return not self.missing

    def __str__(self) -> str:
        parts = [f"{self.n_common} of the model's genes found"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_short(self.missing)})")
        if self.extra:
            parts.append(f"{len(self.extra)} not in the model ({_short(self.extra)})")
        return "; ".join(parts)


def check_genes(card: ModelCard, genes) -> GeneCheck:
    """Compare a data set's gene names with the card's panel."""
    have = [str(g) for g in genes]
    have_set, card_set = set(have), set(card.genes)
    return GeneCheck(
        missing=[g for g in card.genes if g not in have_set],
        extra=[g for g in have if g not in card_set],
        n_common=len(card_set & have_set),
    )


# -- saving -------------------------------------------------------------------------------
def save_checkpoint(model: nn.Module, card: ModelCard, path, dtype: torch.dtype | str | None = None) -> Path:
    """Write ``model``'s weights and ``card`` to ``path`` atomically; return the path.

    ``dtype`` (e.g. ``torch.float16``) casts floating tensors for shipping; loading always
    gives float32. The bundled weights file is never overwritten.
    """
    path = Path(path)
    if _same_path(path, BUNDLED_PATH):
        raise M2ORTError(
            f"{path} is the bundled model shipped with napari-m2ort; it is not overwritten. "
            "Save your checkpoint under another name."
        )
    card.validate()
    _check_card_matches_model(card, model)
    cast = _resolve_dtype(dtype)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        tensors[name] = t.contiguous()
    metadata = {
        _FORMAT_KEY: _FORMAT,
        _CARD_KEY: card.to_json(),
        _SHA_KEY: _tensor_digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_card_matches_model(card: ModelCard, model: nn.Module) -> None:
    if card.variant not in VARIANTS:
        raise M2ORTError(f"The card names variant {card.variant!r}; known: {', '.join(VARIANTS)}.")
    if not isinstance(model, _arch.M2ORT):  # via the module: survives importlib.reload
        raise M2ORTError(f"save_checkpoint expects an M2ORT model, got {type(model).__name__}.")
    arch = dict(depth=model.depth, embed_dim=model.embed_dim, num_heads=model.num_heads,
                mlp_dim=model.mlp_dim)  # fmt: skip
    if arch != VARIANTS[card.variant]:
        raise M2ORTError(f"The card says {card.variant} ({VARIANTS[card.variant]}) but the model is {arch}.")
    if model.num_genes != len(card.genes):
        raise M2ORTError(f"The model's head has {model.num_genes} genes but the card lists {len(card.genes)}.")
    if bool(model.tied_kv) != bool(card.tied_kv):
        raise M2ORTError(f"The model has tied_kv={model.tied_kv} but the card says {card.tied_kv}.")


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise M2ORTError(f"Weights can be shipped as float16/bfloat16/float32, not {dtype}.")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise M2ORTError(f"Unknown weight dtype {dtype!r}; use float16, bfloat16 or float32.") from None


# -- loading ------------------------------------------------------------------------------
def read_card(path) -> ModelCard:
    """The model card of a checkpoint, without loading its tensors."""
    path = _existing(path)
    with _open(path) as handle:
        return _parse_card(handle.metadata(), path)


def read_digest(path) -> str | None:
    """The SHA-256 of a checkpoint's tensors as stored in its header, without loading
    them: a content id for the weights (None if the file was saved without one)."""
    path = _existing(path)
    with _open(path) as handle:
        return (handle.metadata() or {}).get(_SHA_KEY)


def load_checkpoint(path, device="cpu") -> tuple[M2ORT, ModelCard]:
    """Build the card's variant, load the weights strictly (as float32), eval mode."""
    import timm

    path = _existing(path)
    with _open(path) as handle:  # closed on return: Windows cannot replace an open file
        metadata = handle.metadata() or {}
        card = _parse_card(metadata, path)
        try:
            # Fresh copies: safetensors hands out views of its buffer at unaligned offsets,
            # and MKL's results (and speed) depend on alignment; new tensors are aligned.
            raw = {k: handle.get_tensor(k).clone() for k in handle.keys()}
        except Exception as exc:  # truncated or damaged data section
            raise M2ORTError(f"{path}: the weights cannot be read ({exc}); the file is damaged.") from None
    digest = metadata.get(_SHA_KEY)
    if digest is not None and digest != _tensor_digest(raw):
        raise M2ORTError(
            f"{path}: the weights do not match their checksum; the file is corrupted. Copy or download it again."
        )
    if card.variant not in VARIANTS or not timm.is_model(card.variant):
        raise M2ORTError(
            f"{path}: the card names model variant {card.variant!r}, which this napari-m2ort "
            f"does not know (known: {', '.join(VARIANTS)}). Update napari-m2ort."
        )
    # Built on the meta device (no random init); the loaded tensors become the parameters.
    model = timm.create_model(card.variant, num_classes=len(card.genes), tied_kv=card.tied_kv, device="meta")
    tensors = {k: (t.float() if t.is_floating_point() else t) for k, t in raw.items()}
    problem = _state_mismatch(model, tensors, card)
    if problem:
        raise M2ORTError(f"{path}: the weights do not fit the model card: {problem}.")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device).eval(), card


def load_bundled(device="cpu") -> tuple[M2ORT, ModelCard]:
    """The model shipped with the plugin (M2ORT-S trained on HER2+ breast cancer ST)."""
    path = Path(BUNDLED_PATH)
    if not path.is_file():
        raise M2ORTError(
            f"The bundled model weights are not installed ({path} is missing). Reinstall "
            "napari-m2ort, or load a trained checkpoint file instead."
        )
    return load_checkpoint(path, device=device)


def replace_head(model: M2ORT, n_genes: int, bias=None) -> M2ORT:
    """Give ``model`` a fresh head for ``n_genes`` genes, keeping the encoder (in place).

    ``bias`` (e.g. the training mean per gene) starts every prediction at that baseline,
    which shortens fine-tuning on a new panel; by default the bias is zero.
    """
    if n_genes < 1:
        raise M2ORTError(f"A gene head needs at least one gene, got {n_genes}.")
    model.reset_classifier(n_genes)
    if bias is not None:
        bias = torch.as_tensor(bias, dtype=model.head.bias.dtype).reshape(-1)
        if bias.numel() != n_genes:
            raise M2ORTError(f"The head bias has {bias.numel()} values for {n_genes} genes.")
        with torch.no_grad():
            model.head.bias.copy_(bias)
    return model


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise M2ORTError(f"{path}: no such checkpoint file. Check the path.")
    return path


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise M2ORTError(
            f"{path}: not a safetensors file, or its header is damaged ({exc}). "
            "napari-m2ort reads checkpoints written by its own save_checkpoint."
        ) from None


def _parse_card(metadata: dict[str, str] | None, path: Path) -> ModelCard:
    text = (metadata or {}).get(_CARD_KEY)
    if text is None:
        raise M2ORTError(
            f"{path}: the safetensors file has no napari-m2ort model card, so its genes and "
            "resolution are unknown. Re-save the weights with save_checkpoint and a ModelCard."
        )
    try:
        return ModelCard.from_json(text)
    except M2ORTError as exc:
        raise M2ORTError(f"{path}: {exc}") from None


def _state_mismatch(model: nn.Module, tensors: dict[str, torch.Tensor], card: ModelCard) -> str:
    """One readable sentence about what differs, or '' when the tensors fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = tensors.get("head.weight")
    if head is not None and head.dim() == 2 and head.shape[0] != len(card.genes):
        return f"the head has {head.shape[0]} genes but the card lists {len(card.genes)}"
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    has_v = any(k.endswith("attn.v.weight") for k in tensors)
    if card.tied_kv and has_v:
        return "the card says tied_kv=true but the file has separate value projections"
    if not card.tied_kv and not has_v and any(k.endswith("attn.v.weight") for k in missing):
        return "the card says tied_kv=false but the file has no value projections (tied_kv?)"
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs {expected[k]} expected"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shapes differ for {card.variant} ({_short(shapes, 3)})")
    if missing:
        parts.append(f"missing keys: {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_short(unexpected)}")
    return "; ".join(parts)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False


def _short(items: list[str], n: int = 5) -> str:
    head = ", ".join(map(str, items[:n]))
    return head + (f", … (+{len(items) - n} more)" if len(items) > n else "")
