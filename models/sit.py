"""SiT with REG's entangled class token and REPA's projector heads, plus opt-in speed-ups.

One class covers the three models of the paper's tables:

* REG  (default): the noisy DINOv2 class token is embedded (``cls_projectors2`` + ``wg_norm``),
  prepended to the image tokens, denoised jointly, and read out by ``final_layer.linear_cls``;
* REPA (``cls_token_dim=0``): no extra token, ``pos_embed`` has T rows, REPA checkpoints load;
* SiT  (``cls_token_dim=0, z_dims=()``): no projectors either.

Parameter names, shapes, registration order, initialisation and arithmetic follow the REG release
exactly, so its state_dicts load with ``strict=True`` and, under the same ``torch.manual_seed``,
``SiT(...)`` starts from the release's weights (see ``../shared/spec/reg-reference.md`` section 1).

Options from SpeedrunDiT's ablation ladder (issue 15), every one OFF by default; the defaults are
bitwise the release's model. Each is a constructor argument recorded in ``model.config``:

    norm="rmsnorm"        RMSNorm (same eps) in place of LayerNorm in norm1/norm2, norm_final,
                          wg_norm and (with qk_norm) q_norm/k_norm
    rope=True             2-D axial rotary embedding (EVA-02) on q and k of the image tokens; the
                          class token is not rotated (see AxialRoPE)
    pos_embed="none"      drop the fixed sin-cos table (needs rope=True); "sincos" keeps it
    value_residual=True   blocks 1.. mix their values with block 0's: v = lam v1 + (1 - lam) v,
                          one learnable scalar ``attn.v1_lambda`` per block, starting at 0.5
    routing="sprint"      SPRINT: blocks [route_start, route_end) run on a random subset of the
                          image tokens during training (drop route_drop = 0.75); the sparse
                          path is padded with ``sprint.mask_token``, replaced by it on a
                          fraction path_drop = 0.05 of steps, and fused with the dense head's
                          output by ``sprint.proj`` (Linear 2D -> D)
    routing="tread"       TREAD: the same block range sees a random subset (route_drop = 0.5);
                          the other tokens skip it and are put back in place after it

Routing is drawn by the trainer (``route = model.draw_route(n, generator)``) and passed to
``forward(..., route=route)``; ``route=None`` (sampling, evaluation) is the dense model.
``forward(..., drop_sparse_path=True)`` (SPRINT, sampling) skips the routed blocks and fuses the mask
token in their place: the model of SPRINT's path-drop steps, used by path-drop guidance (samplers.py).
``model.grad_checkpointing = True`` recomputes each block's activations in the backward pass; it
changes no weight and no number and is not part of ``model.config``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint


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
#                      Norms and 2-D rotary position embedding                  #
#################################################################################

class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm, y = x / sqrt(mean(x^2) + eps) [* weight], computed in float32 (as
    LayerNorm is under CUDA autocast) and returned in the input's dtype. No bias.

    The input is made contiguous first: torch's kernel reduces a strided row (the patch
    embedding's output is (N, T, D) with strides (T*D, 1, T)) in another order than a
    contiguous one, so the same values could give different last bits (LayerNorm does not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float().contiguous(), self.normalized_shape, weight, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, affine: bool) -> nn.Module:
    """LayerNorm (the release) or RMSNorm (``norm="rmsnorm"``) with the same eps and affinity."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, elementwise_affine=affine)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., hd): each channel pair (x_2j, x_2j+1) -> (-x_2j+1, x_2j), a quarter turn."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every channel pair of x (N, H, L, hd) by its angle; cos/sin (1|N, 1, L, hd).
    Computed in float32 (q and k are half precision under autocast), returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_pairs(xf) * sin).to(x.dtype)


class AxialRoPE(nn.Module):
    """EVA-02's 2-D axial rotary embedding for a (grid x grid) row-major token layout.

    The head dim is split in two halves: channels [0, hd/2) rotate with the token's row r,
    channels [hd/2, hd) with its column c. Within a half, the pair (2j, 2j+1) turns by the angle
    pos * theta^(-2j / (hd/2)), j < hd/4, theta = 10000 (EVA-02's "lang" frequencies).

    The class token (REG) sits at index 0 and is NOT rotated (cos 1, sin 0: an exact identity).
    It has no place on the grid; EVA-02 leaves its class token unrotated too, and so do
    SpeedrunDiT's dense blocks (its sparse blocks, by contrast, rotate a kept class token as grid
    cell (0, 0), i.e. as if it were the top-left patch). Unrotated, its scores with a patch depend
    on that patch's absolute position only, like a learned/absolute embedding would, instead of
    pretending the global token lives in a corner.

    No parameters: cos and sin are non-persistent buffers, (L, hd) with L = [1 +] grid^2, so
    state_dicts are unchanged.
    """

    def __init__(self, head_dim: int, grid: int, cls_token: bool, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"rope needs a head dim divisible by 4 (2 axes x channel pairs), got {head_dim}")
        quarter = head_dim // 4
        freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))  # (hd/4,)
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        angle = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (T, hd/2)
        angle = angle.repeat_interleave(2, dim=1)                     # (T, hd): both channels of a pair
        cos, sin = angle.cos(), angle.sin()
        if cls_token:                                                  # identity rotation for token 0
            cos = torch.cat([torch.ones(1, head_dim, dtype=cos.dtype), cos])
            sin = torch.cat([torch.zeros(1, head_dim, dtype=sin.dtype), sin])
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)

    def forward(self, index: torch.Tensor | None = None):
        """(cos, sin) for the whole sequence, (1, 1, L, hd) each, or for the tokens ``index``
        (N, K) of it (positions in the full sequence, class token = 0): (N, 1, K, hd)."""
        if index is None:
            return self.cos[None, None], self.sin[None, None]
        return self.cos[index].unsqueeze(1), self.sin[index].unsqueeze(1)


#################################################################################
#                                 Core SiT model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, q_norm, k_norm, proj).

    ``fused_attn=True`` runs torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU); False runs the explicit softmax(q k^T / sqrt(d)) v, for reference.
    ``value_residual=True`` adds ``v1_lambda`` (a scalar, 0.5 at init): v <- lam v1 + (1 - lam) v.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, fused_attn: bool = True,
                 norm: str = "layernorm", value_residual: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # timm's default norm of the release's era: LayerNorm over the head dim, affine, eps 1e-5
        self.q_norm = make_norm(norm, self.head_dim, 1e-5, True) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, 1e-5, True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        if value_residual:  # registered last: the default model's parameter order is unchanged
            self.v1_lambda = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, rope=None, v1: torch.Tensor | None = None):
        """x (B, L, D); rope: (cos, sin) or None; v1: block 0's values (B, H, L, hd) or None.
        Returns (output (B, L, D), this block's own values v (B, H, L, hd))."""
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                        # (B, H, L, hd) each
        own_v = v
        q, k = self.q_norm(q), self.k_norm(k)
        if v1 is not None:
            v = self.v1_lambda * v1 + (1 - self.v1_lambda) * v
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)              # (B, H, L, L)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, L, C)                         # (B, L, D)
        return self.proj(x), own_v


class SiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=True,
                 norm="layernorm", value_residual=False):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size, 1e-6, False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn, norm=norm,
                              value_residual=value_residual)
        self.norm2 = make_norm(norm, hidden_size, 1e-6, False)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, rope=None, v1=None):
        """x (N, L, D), c (N, D) -> (x (N, L, D), the attention's own values (N, H, L, hd))."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1)                  # 6 x (N, D)
        )
        a, v = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, v1)
        x = x + gate_msa.unsqueeze(1) * a
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, v


class FinalLayer(nn.Module):
    """adaLN + linear read-out: image tokens -> patches, and (REG) token 0 -> class-token velocity."""

    def __init__(self, hidden_size, patch_size, out_channels, cls_token_dim=0, norm="layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, 1e-6, False)
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


#################################################################################
#                        Token routing (SPRINT, TREAD)                          #
#################################################################################

@dataclass(frozen=True)
class Route:
    """One training step's routing draw (``SiT.draw_route``), the same on every process.

    keep       (N, K) int64, each row the sorted indices (0..T-1) of the image tokens that the
               routed blocks process for that sample; the class token is always processed too.
    drop_path  SPRINT: replace the whole sparse path's output by the mask token this step.
    """
    keep: torch.Tensor
    drop_path: bool = False

    def rows(self, start: int, stop: int) -> "Route":
        """The samples start..stop-1: draw once for the global batch with a generator seeded
        alike on every rank, then take this rank's rows (distinct tokens per rank, one path-drop
        decision for all, and the same draw whatever the world size)."""
        return Route(self.keep[start:stop], self.drop_path)


class SprintFusion(nn.Module):
    """SPRINT's sparse-dense fusion: the sparse path's output is padded to all tokens with
    ``mask_token`` (or replaced by it entirely on path-drop steps) and fused with the dense
    head's output f: h = proj([f, g]) (Linear 2D -> D), on every token.

    Init (SpeedrunDiT's): mask token zeros; proj xavier-uniform weight, zero bias.
    Without a route (sampling) the fusion reads the routed blocks' output on every token and the
    mask token is unused: under DDP with a static graph, train a SPRINT model with a route every
    step (drop 0 for a dense step).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))   # (1, 1, D)
        self.proj = nn.Linear(2 * hidden_size, hidden_size, bias=True)

    def reset_parameters(self):
        nn.init.zeros_(self.mask_token)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.constant_(self.proj.bias, 0)

    def forward(self, f, g, index=None, drop_path=False):
        """f (N, L, D) dense head output; g the routed blocks' output, (N, K', D) at positions
        index (N, K') of the sequence, or (N, L, D) when index is None (dense), or None when the
        sparse path was not run (path-drop guidance): the mask token on every token."""
        if g is None:
            g = self.mask_token.to(f.dtype).expand(f.shape)           # (N, L, D)
            return self.proj(torch.cat([f, g], dim=-1)).to(f.dtype)
        mask = self.mask_token.to(g.dtype)
        if index is not None:
            g = _scatter_tokens(mask.expand(f.shape), index, g)       # (N, L, D), mask elsewhere
            if drop_path:
                # The whole sparse path replaced; "g * 0" keeps every parameter in the graph
                # (with zero gradients), as DDP with a static graph requires.
                g = g * 0 + mask
        return self.proj(torch.cat([f, g], dim=-1)).to(f.dtype)       # (N, L, D)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), index (N, K) -> (N, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _scatter_tokens(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of base (N, L, D) with rows index (N, K) replaced by src (N, K, D), in place of origin."""
    return base.scatter(1, index.unsqueeze(-1).expand(-1, -1, base.shape[-1]), src)


ROUTING_DEFAULTS = {  # routing -> (route_drop, path_drop); the block range defaults to [2, depth - 2)
    "sprint": (0.75, 0.05),  # SpeedrunDiT: keep 25 % of the tokens, drop the sparse path on 5 % of steps
    "tread": (0.5, 0.0),     # TREAD: 50 % of the tokens skip the routed blocks
}

# Model options (issue 15) and their defaults: the release's model.
OPTION_DEFAULTS = dict(norm="layernorm", rope=False, pos_embed="sincos", value_residual=False,
                       routing="none", route_start=None, route_end=None, route_drop=None, path_drop=None)


def resolve_options(depth: int, **options) -> dict:
    """The options as ``model.config`` records them: defaults filled in, routing defaults
    resolved (block range [2, depth - 2), SPRINT drop 0.75 / path drop 0.05, TREAD drop 0.5)."""
    unknown = set(options) - set(OPTION_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; known: {', '.join(OPTION_DEFAULTS)}")
    opts = {**OPTION_DEFAULTS, **options}
    routing = opts["routing"]
    if routing == "none":
        given = [k for k in ("route_start", "route_end", "route_drop", "path_drop") if opts[k] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given but routing='none'; pass routing='sprint' or 'tread'")
    elif routing in ROUTING_DEFAULTS:
        drop, path_drop = ROUTING_DEFAULTS[routing]
        opts["route_start"] = 2 if opts["route_start"] is None else int(opts["route_start"])
        opts["route_end"] = depth - 2 if opts["route_end"] is None else int(opts["route_end"])
        opts["route_drop"] = drop if opts["route_drop"] is None else float(opts["route_drop"])
        opts["path_drop"] = path_drop if opts["path_drop"] is None else float(opts["path_drop"])
    opts["rope"] = bool(opts["rope"])
    opts["value_residual"] = bool(opts["value_residual"])
    return opts


def complete_config(config: dict) -> dict:
    """A stored ``model_config`` with the options it predates filled in with their defaults, so an
    old checkpoint's config compares equal to ``model.config`` of the model it describes."""
    options = {k: config[k] for k in OPTION_DEFAULTS if k in config}
    return {**config, **resolve_options(config["depth"], **options)}


#################################################################################
#                                      SiT                                      #
#################################################################################

class SiT(nn.Module):
    """Diffusion transformer on latents, with REG's class token and REPA's projectors.

    forward(x, t, y, cls_token, route=None) -> (velocity (N, C, H, W),
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
        # ---- options (issue 15), all off by default ----
        norm: str = "layernorm",
        rope: bool = False,
        pos_embed: str = "sincos",
        value_residual: bool = False,
        routing: str = "none",
        route_start: int | None = None,
        route_end: int | None = None,
        route_drop: float | None = None,
        path_drop: float | None = None,
        # ---- not part of the architecture (not in config) ----
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        z_dims = [int(z) for z in z_dims]
        if cls_token_dim is None:  # REG as released: the class token of the first encoder
            cls_token_dim = z_dims[0] if z_dims else 0
        _check_config(input_size, patch_size, hidden_size, depth, num_heads, num_classes,
                      z_dims, encoder_depth, cls_token_dim, decoder_hidden_size)
        opts = resolve_options(depth, norm=norm, rope=rope, pos_embed=pos_embed, value_residual=value_residual,
                               routing=routing, route_start=route_start, route_end=route_end,
                               route_drop=route_drop, path_drop=path_drop)
        _check_options(opts, depth, hidden_size // num_heads, encoder_depth if z_dims else None)
        self.in_channels = self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.z_dims = z_dims
        self.encoder_depth = encoder_depth
        self.cls_token_dim = cls_token_dim
        self.value_residual = opts["value_residual"]
        self.routing, self.route_start, self.route_end = opts["routing"], opts["route_start"], opts["route_end"]
        self.route_drop, self.path_drop = opts["route_drop"], opts["path_drop"]
        # Recompute each block's activations in the backward pass (memory for time): changes no
        # weight and no number, so it is a plain attribute and not part of config.
        self.grad_checkpointing = grad_checkpointing
        # Everything needed to rebuild this model; stored inside checkpoints.
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels,
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob, num_classes=num_classes, z_dims=list(z_dims),
            projector_dim=projector_dim, encoder_depth=encoder_depth, cls_token_dim=cls_token_dim,
            qk_norm=qk_norm, fused_attn=fused_attn, **opts,
        )

        # Registration order = the release's (it fixes the init draws and parameters() order):
        # x_embedder, t_embedder, y_embedder, pos_embed, blocks, projectors, final_layer,
        # cls_projectors2, wg_norm; the options' parameters come after all of them.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_tokens = self.x_embedder.num_patches + (1 if cls_token_dim else 0)
        if pos_embed == "sincos":
            # Fixed sin-cos embedding; a Parameter (frozen) so it is in the state_dict, as released.
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn, norm=norm,
                     value_residual=value_residual and i > 0)
            for i in range(depth)
        ])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, cls_token_dim, norm=norm)
        if cls_token_dim:
            self.cls_projectors2 = nn.Linear(cls_token_dim, hidden_size, bias=True)
            self.wg_norm = make_norm(norm, hidden_size, 1e-6, True)
        if self.routing == "sprint":
            # Built on a forked RNG and initialised after everything else (initialize_weights), so
            # that every tensor a SPRINT model shares with the default model starts identical.
            with torch.random.fork_rng(devices=[]):
                self.sprint = SprintFusion(hidden_size)
        # 2-D RoPE tables (non-persistent buffers: no state_dict entry).
        self.rope_tables = (AxialRoPE(hidden_size // num_heads, input_size // patch_size, bool(cls_token_dim))
                            if opts["rope"] else None)
        self.initialize_weights()

    def initialize_weights(self):
        # Every Linear: xavier-uniform weight, zero bias (norms keep weight 1, bias 0). The modules
        # are visited in registration order, so the draws are the release's.
        sprint_proj = self.sprint.proj if self.routing == "sprint" else None

        def _basic_init(module):
            if isinstance(module, nn.Linear) and module is not sprint_proj:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Frozen 2-D sin-cos position embedding; the class token (row 0) gets zeros.
        if self.pos_embed is not None:
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

        # Options, after all of the release's draws (none of them draws before this point).
        # Value residual (as SpeedrunDiT): every block's mixing weight starts at 0.5.
        for block in self.blocks:
            if hasattr(block.attn, "v1_lambda"):
                nn.init.constant_(block.attn.v1_lambda, 0.5)
        # SPRINT (as SpeedrunDiT): mask token zeros, fusion xavier-uniform weight and zero bias.
        if self.routing == "sprint":
            self.sprint.reset_parameters()

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

    # ------------------------------------------------------------------ routing
    def draw_route(self, batch_size: int, generator: torch.Generator | None = None,
                   drop: float | None = None, path_drop: float | None = None) -> Route:
        """Draw one step's routing on the CPU: per sample, K = round(T (1 - drop)) image tokens
        uniformly without replacement (sorted), then (SPRINT) one path-drop coin. Seed
        ``generator`` identically on every process (e.g. from (seed, step)) and draw for the
        global batch, then ``route.rows(...)`` (see Route.rows). drop/path_drop default to
        route_drop/path_drop of the config; drop=0 and path_drop=0 give the dense model bitwise."""
        if self.routing == "none":
            raise ValueError("this model has no token routing (routing='none'); build it with routing='sprint' or 'tread'")
        drop = self.route_drop if drop is None else float(drop)
        path_drop = self.path_drop if path_drop is None else float(path_drop)
        _check_drops(self.routing, drop, path_drop)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tokens = self.x_embedder.num_patches
        keep = min(tokens, max(1, round(tokens * (1.0 - drop))))
        scores = torch.rand(batch_size, tokens, generator=generator)   # (N, T) on the CPU
        kept = scores.argsort(dim=1)[:, :keep].sort(dim=1).values       # (N, K)
        drop_path = False
        if self.routing == "sprint":
            drop_path = bool(torch.rand((), generator=generator) < path_drop)
        return Route(kept, drop_path)

    # ------------------------------------------------------------------ forward
    def _block(self, i, x, c, rope, v1):
        block = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, rope, v1, use_reentrant=False)
        return block(x, c, rope, v1)

    def _run(self, first, stop, x, c, rope, v1, zs_out):
        """Blocks first..stop-1 on x (N, L, D). Block 0 supplies v1 (value residual); the
        projectors read the output of block ``encoder_depth`` (1-based) into zs_out."""
        for i in range(first, stop):
            x, v = self._block(i, x, c, rope, v1)
            if i == 0 and self.value_residual:
                v1 = v                                                 # (N, H, L, hd)
            if zs_out is not None and (i + 1) == self.encoder_depth:
                N, L, D = x.shape
                zs_out.extend(proj(x.reshape(-1, D)).reshape(N, L, -1) for proj in self.projectors)
        return x, v1

    def forward(self, x, t, y, cls_token=None, return_zs: bool = True, route: Route | None = None,
                drop_sparse_path: bool = False):
        """x (N, C, H, W) latents, t (N,) in [0, 1], y (N,) labels (num_classes = null),
        cls_token (N, Z) noisy class token (REG models only).
        ``return_zs=False`` skips the projectors (sampling does not use them).
        ``route`` (training with routing='sprint'/'tread'): from ``draw_route``; None = dense.
        ``drop_sparse_path`` (SPRINT, sampling): skip the routed blocks and fuse the mask token in
        their place, the model SPRINT's path-drop training step teaches (path-drop guidance runs
        the unconditional branch this way); the routed blocks' FLOPs are saved."""
        self._check_inputs(x, t, y, cls_token, route)
        if drop_sparse_path and (self.routing != "sprint" or route is not None):
            raise ValueError("drop_sparse_path (path-drop guidance) needs a model trained with routing='sprint' "
                             f"and no route (this one has routing={self.routing!r})")
        x = self.x_embedder(x)                                         # (N, T, D)
        if self.cls_token_dim:
            cls = self.wg_norm(self.cls_projectors2(cls_token.to(x.dtype)))  # (N, D)
            x = torch.cat([cls.unsqueeze(1), x], dim=1)                # (N, 1+T, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        N = x.shape[0]

        c = self.t_embedder(t) + self.y_embedder(y, self.training)     # (N, D)
        rope = self.rope_tables() if self.rope_tables is not None else None   # (1, 1, L, hd) x 2
        zs = [] if return_zs else None
        depth = len(self.blocks)

        if self.routing == "none":
            x, _ = self._run(0, depth, x, c, rope, None, zs)
        else:
            start, end = self.route_start, self.route_end
            f, v1 = self._run(0, start, x, c, rope, None, zs)          # dense head (N, L, D)
            if drop_sparse_path:                     # path-drop guidance: the sparse path is not run
                x = self.sprint(f, None)                               # (N, L, D)
            else:
                if route is None:                    # sampling / evaluation: the range sees every token
                    index, g, rope_s, v1_s = None, f, rope, v1
                else:
                    # The tokens this step routes: the class token (always) and the kept image tokens.
                    index = route.keep.to(x.device, non_blocking=True) + (1 if self.cls_token_dim else 0)
                    if self.cls_token_dim:
                        index = torch.cat([index.new_zeros(N, 1), index], dim=1)   # (N, K')
                    g = _gather_tokens(f, index)                       # (N, K', D)
                    rope_s = self.rope_tables(index) if rope is not None else None
                    v1_s = None if v1 is None else v1.gather(
                        2, index[:, None, :, None].expand(-1, v1.shape[1], -1, v1.shape[-1]))
                g, _ = self._run(start, end, g, c, rope_s, v1_s, None) # routed blocks (N, K', D)
                if self.routing == "tread":
                    # Routed tokens go back in place; the others skipped the range unchanged.
                    x = g if index is None else _scatter_tokens(f, index, g)
                else:
                    # SPRINT: pad the sparse output with the mask token, fuse it with the dense head.
                    x = self.sprint(f, g, index, route is not None and route.drop_path)   # (N, L, D)
            x, _ = self._run(end, depth, x, c, rope, v1, zs)          # dense tail
        x, cls_out = self.final_layer(x, c)                            # (N, T, p*p*C), (N, Z) | None
        return self.unpatchify(x), (zs if return_zs else []), cls_out

    def _check_inputs(self, x, t, y, cls_token, route=None):
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
        if route is not None:
            if self.routing == "none":
                raise ValueError("route given, but this model has no token routing (routing='none')")
            keep, tokens = route.keep, self.x_embedder.num_patches
            if keep.ndim != 2 or keep.shape[0] != n or not 1 <= keep.shape[1] <= tokens or keep.dtype != torch.long:
                raise ValueError(f"route.keep must be an int64 tensor of shape ({n}, K), 1 <= K <= {tokens}, "
                                 f"got {keep.dtype} {tuple(keep.shape)}")


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


def _check_drops(routing: str, drop: float, path_drop: float) -> None:
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"route_drop: the route drop must be in [0, 1), got {drop}")
    if not 0.0 <= path_drop <= 1.0 or (routing == "tread" and path_drop):
        raise ValueError(f"path_drop must be in [0, 1] (and 0 for TREAD), got {path_drop}")


def _check_options(opts, depth, head_dim, encoder_depth):
    """encoder_depth: the projectors' block (1-based), None without projectors."""
    if opts["norm"] not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {opts['norm']!r}")
    if opts["pos_embed"] not in ("sincos", "none"):
        raise ValueError(f"pos_embed must be 'sincos' or 'none', got {opts['pos_embed']!r}")
    if opts["pos_embed"] == "none" and not opts["rope"]:
        raise ValueError("pos_embed='none' needs rope=True (the model would have no position information)")
    if opts["rope"] and head_dim % 4:
        raise ValueError(f"rope needs a head dim divisible by 4 (2 axes x channel pairs), got {head_dim}")
    if opts["routing"] not in ("none", *ROUTING_DEFAULTS):
        raise ValueError(f"routing must be 'none', 'sprint' or 'tread', got {opts['routing']!r}")
    if opts["routing"] == "none":
        return
    start, end = opts["route_start"], opts["route_end"]
    if not 1 <= start < end <= depth:
        raise ValueError(f"routed blocks [route_start, route_end) must satisfy 1 <= start < end <= depth ({depth}), "
                         f"got [{start}, {end})")
    _check_drops(opts["routing"], opts["route_drop"], opts["path_drop"])
    if encoder_depth is not None and start < encoder_depth <= end:
        raise ValueError(f"encoder_depth {encoder_depth} taps a routed block (blocks {start + 1}..{end}, 1-based); "
                         f"the projectors need all tokens: use encoder_depth <= route_start ({start}) or > route_end ({end})")


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
    # Patch 1 (issue 15.7), for latent spaces with 16x downsampling (e.g. SpeedrunDiT's SiT-B/1 on
    # a 16x16 latent grid at 256 px): the same token count as /2 on SD-VAE's 32x32 latents.
    "SiT-XL/1": (28, 1152, 16, 1), "SiT-L/1": (24, 1024, 16, 1), "SiT-B/1": (12, 768, 12, 1),
    "SiT-S/1": (12, 384, 6, 1),
    # Not in the paper: a tiny size for the CPU demo, and a smaller one for fast tests.
    "SiT-T/2": (6, 256, 4, 2), "SiT-T/4": (6, 256, 4, 4),
    "SiT-XS/2": (4, 64, 2, 2),
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

