"""M2ORT: the many-to-one regression transformer (Wang et al., arXiv 2401.10608).

One spot is seen at three magnifications (224, 112 and 56 px of the same field of view).
Each level gets its own patch embedding (LDPE) onto the same 14 x 14 token grid, the three
embeddings are stacked on the channel axis, and a ViT-like encoder mixes tokens with
level-dependent projections (ITMM: queries from level 1, keys from level 2, values from
level 3) and channels across levels (ICMM). The CLS token regresses G gene values.

The architecture follows ``shared/M2ORT_SPEC.md`` exactly; a correct build reproduces the
spec's parameter counts (S 7,620,874 / B 17,137,946 / L 55,485,754 with G = 250).

The variants are registered with timm, so ``timm.create_model("m2ort_small",
num_classes=G)`` is the single entry point. There are no hub weights: trained weights
travel as safetensors files with a model card (``model/weights.py``).

The file is laid out like timm's ``vision_transformer.py``: blocks, the model, pretrained
configs, ``_create_m2ort``, and the registered entrypoints. The CPU inference kernels that
the blocks call instead of ``nn.Linear`` and SDPA live in ``_cpu_ops.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from timm.layers import DropPath, trunc_normal_
from timm.models import _registry as _timm_registry
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..errors import M2ORTError
from ._cpu_ops import attention, autocast_on, linear

__all__ = [
    "M2ORT",
    "LevelEmbedding",
    "LDPE",
    "ITMM",
    "ICMM",
    "Block",
    "flops_per_spot",
    "executed_flops_per_spot",
    "VARIANTS",
]

GRID = 14  # tokens per side at every level
NUM_PATCHES = GRID * GRID
HEAD_DIM = 64
LEVEL_SIZES = (224, 112, 56)
LEVEL_PATCHES = (16, 8, 4)


# -- blocks ----------------------------------------------------------------------------
class LevelEmbedding(nn.Module):
    """Patch embedding for one magnification level.

    LN(p*p*3) -> Linear(-> hidden) -> GELU -> Linear(-> D/3) -> LN(D/3). The LayerNorm comes
    before the first Linear, so this cannot be a strided convolution; the patches are cut
    with a single view/permute (one copy) instead of loops or ``unfold``.
    """

    def __init__(self, patch: int, hidden: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch = patch
        in_dim = patch * patch * 3
        self.norm_in = nn.LayerNorm(in_dim, **dd)
        self.fc1 = nn.Linear(in_dim, hidden, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim, **dd)
        self.norm_out = nn.LayerNorm(out_dim, **dd)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 14p, 14p) -> (B, 196, p*p*3): row-major tokens, (py, px, c) features."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p)
        # -> (B, gy, gx, py, px, c): channel fastest, as in the reference's rearrange.
        x = x.permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(self.patchify(x))
        x = linear(linear(x, self.fc1, gelu=True), self.fc2)
        return self.norm_out(x)


class LDPE(nn.Module):
    """Level-dependent patch embedding: three 14x14 token grids stacked on channels."""

    def __init__(self, embed_dim: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        g = embed_dim // 3
        self.num_patches = NUM_PATCHES
        p1, p2, p3 = LEVEL_PATCHES  # 16, 8, 4: a 14 x 14 grid at 224, 112 and 56 px
        self.level1 = LevelEmbedding(p1, embed_dim, g, **dd)
        self.level2 = LevelEmbedding(p2, embed_dim // 2, g, **dd)
        self.level3 = LevelEmbedding(p3, embed_dim // 4, g, **dd)

    def forward(self, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor) -> torch.Tensor:
        # Channel layout [level 1 | level 2 | level 3]; ITMM relies on this order.
        return torch.cat([self.level1(l1), self.level2(l2), self.level3(l3)], dim=-1)


class ITMM(nn.Module):
    """Intra-level token mixing: attention with q, k, v from the three level groups.

    The input is already layer-normed. q, k and v are projected from the channel groups
    [0, D/3), [D/3, 2D/3), [2D/3, D) by slicing a view (no copy), so each projection is a
    plain GEMM with a strided input. ``tied_kv`` reuses the key projection for the values
    (the authors' released code until late 2025).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        tied_kv: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % 3:
            raise ValueError(f"embed_dim {dim} must be divisible by 3")
        self.dim = dim
        self.group = dim // 3
        self.num_heads = num_heads
        self.head_dim = HEAD_DIM
        self.scale = HEAD_DIM**-0.5  # 1/8, what SDPA uses by default for head dim 64
        inner = num_heads * HEAD_DIM
        self.tied_kv = tied_kv
        self.q = nn.Linear(self.group, inner, bias=False, **dd)
        self.k = nn.Linear(self.group, inner, bias=False, **dd)
        self.v = None if tied_kv else nn.Linear(self.group, inner, bias=False, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv(self, x: torch.Tensor, num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project the three groups; returns q, k, v as (B, heads, N, 64) views.

        ``num_queries``: project queries for the first tokens only (keys and values
        still come from all of them)."""
        b, n, _ = x.shape
        g = self.group
        nq = n if num_queries is None else num_queries
        q = linear(x[:, :nq, :g], self.q)
        k = linear(x[..., g : 2 * g], self.k)
        v = linear(x[..., 2 * g :], self.k if self.v is None else self.v)
        heads = (self.num_heads, self.head_dim)
        return (
            q.view(b, nq, *heads).transpose(1, 2),
            k.view(b, n, *heads).transpose(1, 2),
            v.view(b, n, *heads).transpose(1, 2),
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, num_queries: int | None = None
    ) -> torch.Tensor:
        """Attention on normed tokens ``x``; ``residual`` (only when dropout is off) is
        added inside the output projection. With ``num_queries`` only the first tokens
        attend (to all), and the output has that many tokens."""
        q, k, v = self.qkv(x, num_queries)
        x = attention(q, k, v, self.scale, self.attn_drop if self.training else 0.0)
        b, h, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, n, h * d)  # a view: the CPU kernel writes (B, N, H, d)
        if residual is not None:
            return linear(x, self.proj, residual=residual)
        return self.proj_drop(linear(x, self.proj))


class ICMM(nn.Module):
    """Inter-level channel mixing: LN'd tokens -> Linear(D->M) -> GELU -> Linear(M->D).

    timm's ``Mlp`` with the same parameter names (``fc1``, ``fc2``), written out so the
    CPU inference path can fuse bias and GELU into the GEMM (see ``_cpu_ops.linear``).
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual`` (only when dropout is off) is added inside fc2."""
        x = self.drop1(linear(x, self.fc1, gelu=True))
        if residual is not None:
            return linear(x, self.fc2, residual=residual)
        return self.drop2(linear(x, self.fc2))


class Block(nn.Module):
    """Pre-norm encoder block: x + ITMM(LN(x)), then x + ICMM(LN(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        tied_kv: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.attn = ITMM(dim, num_heads, tied_kv, attn_drop, drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = ICMM(dim, mlp_dim, drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.stochastic = drop > 0 or attn_drop > 0 or drop_path > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.stochastic:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        # Same sums, with each residual add handed to the branch's last linear (fused on CPU).
        x = self.attn(self.norm1(x), residual=x)
        return self.mlp(self.norm2(x), residual=x)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for the CLS token only: (B, N, D) -> (B, 1, D).

        Exactly the CLS row of ``forward``: its query attends to every token's keys and
        values, but the other tokens' queries, output projection and MLP are not needed
        by the head, so the last block skips them (13 % of M2ORT-S's FLOPs).
        """
        cls = x[:, :1].contiguous()
        if self.training and self.stochastic:
            cls = cls + self.drop_path1(self.attn(self.norm1(x), num_queries=1))
            return cls + self.drop_path2(self.mlp(self.norm2(cls)))
        cls = self.attn(self.norm1(x), residual=cls, num_queries=1)
        return self.mlp(self.norm2(cls), residual=cls)


# -- model -----------------------------------------------------------------------------
class M2ORT(nn.Module):
    """Many-to-one regression transformer.

    ``forward(level1, level2, level3)`` takes float RGB in [0, 1], NCHW, of shapes
    (B, 3, 224, 224), (B, 3, 112, 112), (B, 3, 56, 56) (the same field of view at full,
    half and quarter resolution) and returns (B, num_genes) predicted targets (float32,
    also under autocast).

    Tip: NHWC memory (``torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255``, i.e.
    channels-last) is the cheapest input: cutting (p, p, 3) patches is then a copy of
    contiguous rows instead of a gather across the three colour planes.
    """

    def __init__(
        self,
        num_classes: int = 250,
        embed_dim: int = 576,
        depth: int = 6,
        num_heads: int = 9,
        mlp_dim: int = 384,
        tied_kv: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if in_chans != 3:
            raise ValueError(f"M2ORT takes RGB input (in_chans=3), got in_chans={in_chans}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if size != (224, 224):
            raise ValueError(f"M2ORT's level-1 input is fixed at 224 x 224, got img_size={img_size}")
        if embed_dim % 12:
            raise ValueError(f"embed_dim must be divisible by 12, got {embed_dim}")
        if num_heads * HEAD_DIM != embed_dim:
            # Not required by the maths, but every published variant has heads * 64 = D.
            warnings.warn(f"num_heads * 64 = {num_heads * HEAD_DIM} differs from embed_dim {embed_dim}", stacklevel=2)
        self.num_classes = self.num_genes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.tied_kv = tied_kv
        self.drop_rate = drop_rate
        self.in_chans = 3
        self.num_prefix_tokens = 1

        self.patch_embed = LDPE(embed_dim, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PATCHES + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_dim, tied_kv, drop_rate, attn_drop_rate, dpr[i], **dd)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- init -------------------------------------------------------------------------
    def init_weights(self) -> None:
        """ViT-style init (the spec does not fix one): trunc-normal 0.02, zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    # -- timm classifier protocol -----------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        """New, freshly initialised gene head (the encoder is kept)."""
        ref = self.norm.weight
        self.num_classes = self.num_genes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            _init_linear(self.head)
        else:
            self.head = nn.Identity()

    # -- forward ----------------------------------------------------------------------
    def embed(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        """LDPE tokens before CLS / position embedding: (B, 196, D)."""
        _check_inputs(level1, level2, level3)
        return self.patch_embed(level1, level2, level3)

    def forward_features(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        """Encoded, final-normed tokens (B, 197, D); index 0 is the CLS token."""
        return self.norm(self.blocks(self._tokens(level1, level2, level3)))

    def _tokens(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        """CLS + LDPE tokens with position embedding: the encoder's input (B, 197, D)."""
        x = self.embed(level1, level2, level3)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """CLS token -> genes. Under autocast the head still runs in float32: it is one
        row per spot (free), and bf16 outputs would round log-expression to ~0.03."""
        x = self.head_drop(x[:, 0])
        if pre_logits:
            return x
        if autocast_on(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.head(x.to(self.norm.weight.dtype))
        return self.head(x)

    def forward_cls(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        """Final-normed CLS token only, (B, 1, D): what the head reads. Equal to
        ``forward_features(...)[:, :1]``, with the last block computed for CLS alone."""
        x = self._tokens(level1, level2, level3)
        if len(self.blocks) == 0:
            return self.norm(x[:, :1])
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.norm(self.blocks[-1].forward_cls(x))

    def forward(self, level1: torch.Tensor, level2: torch.Tensor, level3: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_cls(level1, level2, level3))


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _check_inputs(*levels: torch.Tensor) -> None:
    """Catch swapped or wrongly sized levels early, with shapes in the message."""
    for i, (x, size) in enumerate(zip(levels, LEVEL_SIZES), start=1):
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"level{i} must be (B, 3, {size}, {size}) float in [0, 1], got {tuple(x.shape)}")
    if not (levels[0].shape[0] == levels[1].shape[0] == levels[2].shape[0]):
        raise ValueError(f"the three levels have different batch sizes: {[x.shape[0] for x in levels]}")


# -- FLOPs -----------------------------------------------------------------------------
def flops_per_spot(model: M2ORT) -> int:
    """Analytic forward FLOPs for one spot: 2 x (linear multiply-adds + attention products).

    Norms, GELU, softmax and adds are left out (they are memory-bound and small), so the
    figure is the GEMM work a FLOP-rate comparison should use. M2ORT-S: 3.42 GFLOP.
    """
    n = model.patch_embed.num_patches
    macs = 0
    for m in model.patch_embed.modules():
        if isinstance(m, nn.Linear):
            macs += n * m.in_features * m.out_features
    for blk in model.blocks:
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                macs += (n + 1) * m.in_features * m.out_features
        if blk.attn.v is None:  # tied: the key projection runs twice
            macs += (n + 1) * blk.attn.k.in_features * blk.attn.k.out_features
        inner = blk.attn.num_heads * blk.attn.head_dim
        macs += 2 * (n + 1) * (n + 1) * inner  # q @ k^T and attn @ v
    if isinstance(model.head, nn.Linear):
        macs += model.head.in_features * model.head.out_features
    return 2 * macs


def executed_flops_per_spot(model: M2ORT) -> int:
    """FLOPs ``forward`` actually runs per spot: ``flops_per_spot`` minus what the
    CLS-only last block skips (the other tokens' queries, attention rows, output
    projection and MLP). M2ORT-S: 2.99 GFLOP."""
    total = flops_per_spot(model)
    if len(model.blocks) == 0:
        return total
    n = model.patch_embed.num_patches  # tokens besides CLS, all skipped
    blk = model.blocks[-1]
    a = blk.attn
    inner = a.num_heads * a.head_dim
    skipped = n * (
        a.q.in_features * inner
        + a.proj.in_features * a.proj.out_features
        + blk.mlp.fc1.in_features * blk.mlp.fc1.out_features
        + blk.mlp.fc2.in_features * blk.mlp.fc2.out_features
    )
    skipped += 2 * n * (n + 1) * inner  # the other tokens' rows of q @ k^T and attn @ v
    return total - 2 * skipped


# -- pretrained configs ----------------------------------------------------------------
# depth, embed_dim, num_heads, mlp_dim (spec table; heads * 64 = D, M = 2D/3)
VARIANTS: dict[str, dict[str, int]] = {
    "m2ort_small": dict(depth=6, embed_dim=576, num_heads=9, mlp_dim=384),
    "m2ort_base": dict(depth=8, embed_dim=768, num_heads=12, mlp_dim=512),
    "m2ort_large": dict(depth=12, embed_dim=1152, num_heads=18, mlp_dim=768),
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 250,
        "input_size": (3, 224, 224),  # level 1; levels 2 and 3 are 112 and 56
        "fixed_input_size": True,
        "mean": (0.0, 0.0, 0.0),  # inputs are [0, 1] RGB without normalisation
        "std": (1.0, 1.0, 1.0),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": None,  # no conv stem: timm must not try to adapt input channels
        "classifier": "head",
        "paper_ids": "arXiv:2401.10608",
        "paper_name": "M2ORT: Many-To-One Regression Transformer for Spatial Transcriptomics "
        "Prediction from Histopathology Images",
        "origin_url": "https://github.com/Dootmaan/M2ORT",
        "license": "bsd-3-clause",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


# -- creation --------------------------------------------------------------------------
def _create_m2ort(variant: str, pretrained: bool = False, **kwargs: Any) -> M2ORT:
    if pretrained:
        raise M2ORTError(
            f"{variant} has no downloadable weights (pretrained=True). Create it with "
            "pretrained=False and load a trained .safetensors file with "
            "napari_m2ort.model.weights.load_checkpoint (or load_bundled)."
        )
    model_args = {**VARIANTS[variant], **kwargs}
    return build_model_with_cfg(M2ORT, variant, pretrained=False, **model_args)


def _register(fn):
    """``register_model`` that tolerates this module being imported or reloaded twice.

    timm warns when a name is registered again; a reload of *this* module is expected
    (tests, ``importlib.reload``) and is re-registered quietly so the registry points at
    the current class. A clash with a model from another module keeps timm's warning.
    """
    old = _timm_registry._model_entrypoints.get(fn.__name__)
    if old is not None and getattr(old, "__module__", None) == fn.__module__:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"Overwriting {fn.__name__} in registry")
            return register_model(fn)
    return register_model(fn)


# -- registered entrypoints ------------------------------------------------------------
@_register
def m2ort_small(pretrained: bool = False, **kwargs: Any) -> M2ORT:
    """M2ORT-S: depth 6, D 576, 9 heads, M 384 (7.62 M parameters with 250 genes)."""
    return _create_m2ort("m2ort_small", pretrained, **kwargs)


@_register
def m2ort_base(pretrained: bool = False, **kwargs: Any) -> M2ORT:
    """M2ORT-B: depth 8, D 768, 12 heads, M 512 (17.1 M parameters with 250 genes)."""
    return _create_m2ort("m2ort_base", pretrained, **kwargs)


@_register
def m2ort_large(pretrained: bool = False, **kwargs: Any) -> M2ORT:
    """M2ORT-L: depth 12, D 1152, 18 heads, M 768 (55.5 M parameters with 250 genes)."""
    return _create_m2ort("m2ort_large", pretrained, **kwargs)
