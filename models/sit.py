"""SiT with REG's entangled class token and REPA's projector heads.

One class covers the three models of the paper's tables:

* REG  (default): the noisy DINOv2 class token is embedded (``cls_projectors2`` + ``wg_norm``),
  prepended to the image tokens, denoised jointly, and read out by ``final_layer.linear_cls``;
* REPA (``cls_token_dim=0``): no extra token, ``pos_embed`` has T rows, REPA checkpoints load;
* SiT  (``cls_token_dim=0, z_dims=()``): no projectors either.

Parameter names, shapes, initialisation and arithmetic follow the REG release exactly, so its
state_dicts load with ``strict=True`` (see ``../shared/spec/reg-reference.md`` section 1).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed


def modulate(x, shift, scale):
    # adaLN: x (N, L, D), shift/scale (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear -> SiLU -> Linear -> SiLU -> Linear (indices 0, 2, 4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


#################################################################################
#               Embedding layers for time steps and class labels                #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a 2-layer MLP.

    QUIRK kept from the release: t in [0, 1] enters frequencies built for integer steps
    (max period 10000), so the embedding changes little over the whole path.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) -> (N, dim): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half), computed in float32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train: bool, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core SiT model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, q_norm, k_norm, proj).

    ``fused_attn=True`` runs torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU); False runs the explicit softmax(q k^T / sqrt(d)) v, for reference.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, fused_attn: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # timm's default norm of the release's era: LayerNorm over the head dim, affine, eps 1e-5
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                        # (B, H, L, hd) each
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)              # (B, H, L, L)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, L, C)                         # (B, L, D)
        return self.proj(x)


class SiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1)                  # 6 x (N, D)
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN + linear read-out: image tokens -> patches, and (REG) token 0 -> class-token velocity."""

    def __init__(self, hidden_size, patch_size, out_channels, cls_token_dim=0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if cls_token_dim:
            self.linear_cls = nn.Linear(hidden_size, cls_token_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.has_cls = bool(cls_token_dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)                 # (N, [1+]T, D)
        if not self.has_cls:
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])         # (N, T, p*p*C), (N, Z)


class SiT(nn.Module):
    """Diffusion transformer on latents, with REG's class token and REPA's projectors.

    forward(x, t, y, cls_token) -> (velocity (N, C, H, W),
                                    [projected features (N, [1+]T, Z_k) per encoder],
                                    class-token velocity (N, Z) or None)
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        encoder_depth: int = 8,
        cls_token_dim: int | None = None,
        qk_norm: bool = False,
        fused_attn: bool = True,
        decoder_hidden_size: int | None = None,
    ):
        super().__init__()
        z_dims = [int(z) for z in z_dims]
        if cls_token_dim is None:  # REG as released: the class token of the first encoder
            cls_token_dim = z_dims[0] if z_dims else 0
        _check_config(input_size, patch_size, hidden_size, depth, num_heads, num_classes,
                      z_dims, encoder_depth, cls_token_dim, decoder_hidden_size)
        self.in_channels = self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.z_dims = z_dims
        self.encoder_depth = encoder_depth
        self.cls_token_dim = cls_token_dim
        # Everything needed to rebuild this model; stored inside checkpoints.
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes, z_dims=list(z_dims),
            projector_dim=projector_dim, encoder_depth=encoder_depth, cls_token_dim=cls_token_dim,
            qk_norm=qk_norm, fused_attn=fused_attn,
        )

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_tokens = self.x_embedder.num_patches + (1 if cls_token_dim else 0)
        # Fixed sin-cos embedding; a Parameter (frozen) so it is in the state_dict, as released.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
            for _ in range(depth)
        ])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, cls_token_dim)
        if cls_token_dim:  # registered last, as in the release (this order fixes the init draws)
            self.cls_projectors2 = nn.Linear(cls_token_dim, hidden_size, bias=True)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self):
        # Every Linear: xavier-uniform weight, zero bias (LayerNorms keep weight 1, bias 0).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Frozen 2-D sin-cos position embedding; the class token (row 0) gets zeros.
        grid = int(self.x_embedder.num_patches ** 0.5)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, extra_tokens=1 if self.cls_token_dim else 0)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        # Patch embedding initialised like a Linear on its (D, C*p*p) view.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity ...
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        # ... and both read-outs start at zero velocity.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)
        if self.cls_token_dim:
            nn.init.constant_(self.final_layer.linear_cls.weight, 0)
            nn.init.constant_(self.final_layer.linear_cls.bias, 0)

    def compile_blocks(self, **compile_kwargs) -> "SiT":
        """torch.compile each transformer block in place (regional compilation): one compiled
        graph serves every block, compile time stays short, and parameter names and
        checkpoints are unchanged. Numbers change slightly (fused kernels)."""
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, h*p, w*p); each token's values are laid out (p, p, C)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, cls_token=None, return_zs: bool = True):
        """x (N, C, H, W) latents, t (N,) in [0, 1], y (N,) labels (num_classes = null),
        cls_token (N, Z) noisy class token (REG models only).
        ``return_zs=False`` skips the projectors (sampling does not use them)."""
        self._check_inputs(x, t, y, cls_token)
        x = self.x_embedder(x)                                         # (N, T, D)
        if self.cls_token_dim:
            cls = self.wg_norm(self.cls_projectors2(cls_token.to(x.dtype)))  # (N, D)
            x = torch.cat([cls.unsqueeze(1), x], dim=1)                # (N, 1+T, D)
        x = x + self.pos_embed
        N, L, D = x.shape

        c = self.t_embedder(t) + self.y_embedder(y, self.training)     # (N, D)

        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)                                            # (N, L, D)
            if return_zs and (i + 1) == self.encoder_depth:
                zs = [proj(x.reshape(-1, D)).reshape(N, L, -1) for proj in self.projectors]
        x, cls_out = self.final_layer(x, c)                            # (N, T, p*p*C), (N, Z) | None
        return self.unpatchify(x), zs, cls_out

    def _check_inputs(self, x, t, y, cls_token):
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"SiT expects latents of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        n = x.shape[0]
        if t.ndim != 1 or t.shape[0] not in (1, n):
            raise ValueError(f"t must have shape ({n},) (one time per sample), got {tuple(t.shape)}")
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},) (one label per sample), got {tuple(y.shape)}")
        if not torch.compiler.is_compiling() and not y.is_cuda and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes} ({self.num_classes} = null class), "
                             f"got {y.min().item()}..{y.max().item()}")
        if self.cls_token_dim:
            if cls_token is None:
                raise ValueError(f"this REG model denoises a class token: pass cls_token of shape (N, {self.cls_token_dim}) "
                                 "(build with cls_token_dim=0 for a plain SiT/REPA model)")
            if cls_token.shape != (x.shape[0], self.cls_token_dim):
                raise ValueError(f"cls_token must have shape ({x.shape[0]}, {self.cls_token_dim}), got {tuple(cls_token.shape)}")
        elif cls_token is not None:
            raise ValueError("this model has no class token (cls_token_dim=0); call it with cls_token=None")


def _check_config(input_size, patch_size, hidden_size, depth, num_heads, num_classes,
                  z_dims, encoder_depth, cls_token_dim, decoder_hidden_size):
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 for the 2-D sin-cos embedding")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if z_dims and not 1 <= encoder_depth <= depth:
        raise ValueError(f"encoder_depth must be in 1..{depth} (the model's depth), got {encoder_depth}")
    if any(z < 1 for z in z_dims) or cls_token_dim < 0:
        raise ValueError(f"encoder widths must be positive, got z_dims={z_dims}, cls_token_dim={cls_token_dim}")
    if decoder_hidden_size not in (None, hidden_size):
        # The release's S configs pass no decoder width (768 != 384) and cannot run; ours use D.
        raise ValueError(f"decoder_hidden_size must equal hidden_size ({hidden_size}), got {decoder_hidden_size}")


#################################################################################
#                   Sine/cosine positional embedding (MAE recipe)               #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, extra_tokens: int = 0) -> np.ndarray:
    """(extra_tokens + grid_size**2, embed_dim); the extra (class) tokens get zero rows.
    The first half of the channels encodes the column index, the second half the row index."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32),
                             indexing="ij")
    emb = np.concatenate([
        _1d_sincos(embed_dim // 2, cols.reshape(-1)),
        _1d_sincos(embed_dim // 2, rows.reshape(-1)),
    ], axis=1)                                                         # (T, D)
    if extra_tokens:
        emb = np.concatenate([np.zeros([extra_tokens, embed_dim]), emb], axis=0)
    return emb


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin(pos w_i), cos(pos w_i)], w_i = 1 / 10000^(2i/embed_dim)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                  SiT configs                                  #
#################################################################################

# name -> (depth, hidden_size, num_heads, patch_size); the keys are the CLI's --model choices.
SIT_CONFIGS = {
    "SiT-XL/2": (28, 1152, 16, 2), "SiT-XL/4": (28, 1152, 16, 4), "SiT-XL/8": (28, 1152, 16, 8),
    "SiT-L/2": (24, 1024, 16, 2), "SiT-L/4": (24, 1024, 16, 4), "SiT-L/8": (24, 1024, 16, 8),
    "SiT-B/2": (12, 768, 12, 2), "SiT-B/4": (12, 768, 12, 4), "SiT-B/8": (12, 768, 12, 8),
    "SiT-S/2": (12, 384, 6, 2), "SiT-S/4": (12, 384, 6, 4), "SiT-S/8": (12, 384, 6, 8),
    # Not in the paper: a tiny size for CPU demos and tests.
    "SiT-T/2": (6, 256, 4, 2), "SiT-T/4": (6, 256, 4, 4),
}


def _builder(name):
    depth, hidden, heads, patch = SIT_CONFIGS[name]

    def build(**kwargs):
        return SiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)
    build.__name__ = name.replace("-", "_").replace("/", "_")
    return build


SiT_models = {name: _builder(name) for name in SIT_CONFIGS}


def paper_encoder_depth(depth: int) -> int:
    """The alignment layer of the paper's recipes: 4 for SiT-B (depth 12) and smaller, 8 for SiT-L/XL."""
    return 4 if depth <= 12 else 8


def create_model(name: str, **kwargs) -> SiT:
    """SiT_models[name](**kwargs) with a clear error for an unknown name."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SiT_models)}")
    return SiT_models[name](**kwargs)

