"""The AVMoE adapter: token mapping, router, cross-modal and unimodal experts (AVMoE paper, section 3; yingchengy/AVMOE ``AVMOE/AVE/nets/net_trans_v3.py`` ``ExpertAdapter`` / ``MoEAdapter``).

All tensors are channel-last: x (M, N, C) is the target modality (M = B*T frames, N tokens, width C), ``other``
(M, N', C') the other modality. The official code holds them as (M, C, N, 1) for Conv2d; every 1x1 convolution
here is the equivalent matrix product on the channel-last layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig


class GroupedLinear(nn.Module):
    """Grouped 1x1 convolution without bias on channel-last tokens (== ``nn.Conv2d(in, out, 1, groups=g)``)."""

    def __init__(self, in_dim: int, out_dim: int, groups: int) -> None:
        super().__init__()
        if in_dim % groups or out_dim % groups:
            raise ValueError(f"conv_groups={groups} must divide both widths {in_dim} and {out_dim}")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, out_dim // groups, in_dim // groups))
        bound = 1.0 / math.sqrt(in_dim // groups)  # Conv2d default init (kaiming_uniform, a=sqrt(5))
        nn.init.uniform_(self.weight, -bound, bound)

    def dense_weight(self) -> Tensor:  # (out, in), block-diagonal over the groups
        return self.weight[0] if self.groups == 1 else torch.block_diag(*self.weight.unbind(0))

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        # One dense GEMM with a block-diagonal weight: the weights are tiny, a single kernel beats g small ones.
        return F.linear(x, self.dense_weight())


class TokenMapping(nn.Module):
    """Other modality (M, N', C') -> (M, N, C): 1x1 conv over the token axis (dense N'xN mixing with bias,
    shared over channels), then Linear C' -> C.

    Both maps are linear, so the token mixing (the expensive N x N' product) runs at the narrower of C and C':
    ``fc(W y + b 1^T) = W (y A^T) + b (A 1)^T + c`` for ``fc = (A, c)``; same parameters, same math.
    """

    def __init__(self, other_tokens: int, tokens: int, other_dim: int, dim: int) -> None:
        super().__init__()
        self.token_weight = nn.Parameter(torch.empty(tokens, other_tokens))  # (N, N')
        self.token_bias = nn.Parameter(torch.empty(tokens))  # (N,)
        bound = 1.0 / math.sqrt(other_tokens)  # Conv2d(N', N, 1) default init
        nn.init.uniform_(self.token_weight, -bound, bound)
        nn.init.uniform_(self.token_bias, -bound, bound)
        self.fc = nn.Linear(other_dim, dim)

    def forward(self, other: Tensor) -> Tensor:  # (M, N', C') -> (M, N, C)
        # One (N, N') @ (N', M*c) GEMM over all frames in token-major layout (bias fused into addmm). A 2D @ 3D
        # ``torch.matmul`` instead clones its transposed operand to fold it and leaves a strided result; its
        # backward would materialise the (M, N, N') weight gradient if the weight were expanded to a bmm.
        m, n_src, _ = other.shape
        tokens = self.token_weight.shape[0]
        if self.fc.in_features <= self.fc.out_features:  # mix at C', then widen
            src = other.transpose(0, 1).reshape(n_src, -1)  # (N', M*C')
            z = torch.addmm(self.token_bias[:, None], self.token_weight, src).view(tokens, m, -1)  # (N, M, C')
            return self.fc(z).transpose(0, 1).contiguous()  # (M, N, C)
        src = F.linear(other, self.fc.weight).transpose(0, 1).reshape(n_src, -1)  # narrow first: (N', M*C)
        z = torch.mm(self.token_weight, src).view(tokens, m, -1)  # (N, M, C)
        bias = self.token_bias[:, None] * self.fc.weight.sum(1) + self.fc.bias  # (N, C)
        return (z + bias[:, None]).transpose(0, 1).contiguous()


class Router(nn.Module):
    """Per-frame soft routing: softmax(MLP([mean_N x ; mean_N y]) + noise), noise only in training."""

    def __init__(self, in_dim: int, hidden: list[int], num_experts: int, noise_std: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, num_experts))
        self.mlp = nn.Sequential(*layers)
        self.noise_std = noise_std

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # (M, N, C), (M, N, C) -> (M, E)
        return self.route(x.mean(1), y.mean(1))

    def route(self, x_mean: Tensor, y_mean: Tensor) -> Tensor:  # (M, C), (M, C) token means -> (M, E)
        logits = self.mlp(torch.cat([x_mean, y_mean], dim=-1))
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        return logits.softmax(dim=-1)


class LatentTokens(nn.Module):
    """Latent-token attention: T tokens (init U[0,1)) summarise ``source``, then every token of x reads them.

    ``t = t0 + softmax_N(t0 source^T) source``; ``x' = x + gate * softmax_T(x t^T) t`` with gate init 0. Raw dot
    products: no scaling and no projections, as in the official code.
    """

    def __init__(self, num_latents: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.rand(num_latents, dim))  # (T, C)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, source: Tensor) -> Tensor:  # (M, N, C), (M, N', C) -> (M, N, C)
        return self.read(x, self.summarise(source))

    def summarise(self, source: Tensor) -> Tensor:  # (M, N', C) -> t (M, T, C)
        # (M*N', C) @ (C, T): one folded GEMM on the contiguous source, softmax over N' on the strided view
        att = torch.matmul(source, self.tokens.t()).softmax(dim=1)  # (M, N', T)
        return self.tokens + torch.bmm(att.transpose(1, 2), source)

    def read(self, x: Tensor, t: Tensor) -> Tensor:  # (M, N, C), (M, T, C) -> (M, N, C)
        att = torch.bmm(x, t.transpose(1, 2)).softmax(dim=-1)  # (M, N, T)
        return x + self.gate * torch.bmm(att, t)


class Bottleneck(nn.Module):
    """LN_before -> grouped 1x1 C->C/r -> [BN] -> [ReLU] -> grouped 1x1 C/r->C -> [BN] -> LN_post.

    BatchNorm statistics are per channel over all M*N positions (BatchNorm2d on the official (M, C, N, 1)).
    """

    def __init__(self, dim: int, reduction: int, groups: int, use_bn: bool, activation: bool) -> None:
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"reduction={reduction} leaves no bottleneck channels at width {dim}")
        self.ln_before = nn.LayerNorm(dim)
        self.down = GroupedLinear(dim, hidden, groups)
        self.bn_down = nn.BatchNorm1d(hidden) if use_bn else None
        self.activation = activation
        self.up = GroupedLinear(hidden, dim, groups)
        self.bn_up = nn.BatchNorm1d(dim) if use_bn else None
        self.ln_post = nn.LayerNorm(dim)

    @staticmethod
    def _bn(bn: Optional[nn.BatchNorm1d], h: Tensor) -> Tensor:
        return h if bn is None else bn(h.reshape(-1, h.shape[-1])).view_as(h)

    def forward(self, x: Tensor) -> Tensor:  # (M, N, C) -> (M, N, C)
        h = self._bn(self.bn_down, self.down(self.ln_before(x)))  # (M, N, C/r)
        if self.activation:
            h = F.relu(h)
        return self.ln_post(self._bn(self.bn_up, self.up(h)))


class CrossModalExpert(nn.Module):
    """CMA: latent tokens summarise the mapped other modality y, x reads them (gated by g_av, init 0), then a
    ReLU bottleneck. The output gate (init 0) lives in ``gate`` and is applied by :class:`MoEAdapter`."""

    def __init__(self, dim: int, cfg: AdapterConfig, gated: bool) -> None:
        super().__init__()
        self.fusion = LatentTokens(cfg.num_latents, dim)
        self.bottleneck = Bottleneck(dim, cfg.reduction, cfg.conv_groups, cfg.use_bn, activation=True)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None

    reads_input = False  # the bottleneck reads the fused tokens, not x itself

    def pre(self, x: Tensor, y: Tensor) -> Tensor:  # (M, N, C), (M, N, C) -> (M, N, C): the bottleneck's input
        return self.fusion(x, y)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # (M, N, C), (M, N, C) -> (M, N, C), ungated
        return self.bottleneck(self.pre(x, y))


class UnimodalExpert(nn.Module):
    """UA: an optional token-mixing pre-step on x alone, then a *linear* bottleneck (no ReLU, as coded).

    Variants (``AdapterConfig.uni_expert``):
    - ``linear``: bottleneck only (AVE, AVQA).
    - ``param_free``: ``A = softmax_row(X^T X)`` over tokens, ``x' = x + g_av * (X A)`` with X = [C, N], i.e.
      ``x'_j = x_j + g_av * sum_i A_ij x_i`` (column-weighted, as coded); g_av init 0 (AVVP).
    - ``mha_frames``: ``nn.MultiheadAttention`` on (M, N, C) without ``batch_first``: it attends across the M
      frames at each token position, and its output *replaces* x (no residual) -- the official S4 quirk.
    - ``latent``: latent-token self-attention over x's own tokens, gated residual (gate_self init 0) (MS3).
    """

    def __init__(self, dim: int, cfg: AdapterConfig, gated: bool) -> None:
        super().__init__()
        self.variant = cfg.uni_expert
        if self.variant == "param_free":
            self.gate_av = nn.Parameter(torch.zeros(1))
        elif self.variant == "mha_frames":
            self.mha = nn.MultiheadAttention(dim, cfg.mha_heads, dropout=cfg.mha_dropout)
        elif self.variant == "latent":
            self.self_attention = LatentTokens(cfg.num_latents, dim)
        elif self.variant != "linear":
            raise ValueError(f"unknown uni_expert {self.variant!r}")
        self.bottleneck = Bottleneck(dim, cfg.reduction, cfg.conv_groups, cfg.use_bn, activation=False)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None

    @property
    def reads_input(self) -> bool:
        """True when the bottleneck reads x itself (``linear``): such experts can share x's LayerNorm."""
        return self.variant == "linear"

    def pre(self, x: Tensor, y: Tensor) -> Tensor:  # (M, N, C) -> (M, N, C): the bottleneck's input; y unused
        return self._pre(x)

    def _pre(self, x: Tensor) -> Tensor:  # (M, N, C) -> (M, N, C)
        if self.variant == "param_free":
            att = torch.bmm(x, x.transpose(1, 2)).softmax(dim=-1)  # (M, N, N), rows softmaxed
            return x + self.gate_av * torch.bmm(att.transpose(1, 2), x)
        if self.variant == "mha_frames":
            return self.mha(x, x, x, need_weights=False)[0]  # sequence axis = frames M, batch axis = tokens N
        if self.variant == "latent":
            return self.self_attention(x, x)
        return x

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # y unused: a unimodal expert sees only its own tokens
        return self.bottleneck(self._pre(x))


def load_balance_loss(weights: Tensor) -> Tensor:
    """KL(uniform || mean routing) = sum_e (1/E)(log(1/E) - log p_e), p = weights.mean(0). weights: (M, E).

    Zero for uniform routing. Note: the released code builds its "uniform" target from ``p.size(0)`` of a (1, E)
    tensor, i.e. a target of ones, which evaluates to ``-sum_e log p_e = E * KL + E log E``: the same minimiser,
    E times the gradient. Multiply ``load_balance_weight`` by E to reproduce the official gradient scale.
    """
    mean = weights.mean(0).clamp_min(torch.finfo(weights.dtype).tiny)  # (E,)
    num = mean.numel()
    return (math.log(1.0 / num) - mean.log()).sum() / num


class MoEAdapter(nn.Module):
    """Dense soft mixture of cross-modal and unimodal experts for one modality at one adapter position.

    ``forward(x (M, N, C), other (M, N', C'))`` returns ``(out (M, N, C), router weights (M, E), lb scalar)``;
    ``out = sum_e w_e * gate_e * expert_e(x, y)`` with ``y = TokenMapping(other)``; experts are ordered
    cross-modal first, then unimodal (as the official router's output units).
    """

    def __init__(
        self, dim: int, other_dim: int, tokens: int, other_tokens: int, cfg: AdapterConfig, gated: bool
    ) -> None:
        super().__init__()
        num_experts = cfg.num_cross_experts + cfg.num_uni_experts
        if num_experts < 1:
            raise ValueError("an MoE adapter needs at least one expert")
        self.token_map = TokenMapping(other_tokens, tokens, other_dim, dim)
        self.router = Router(2 * dim, list(cfg.router_hidden), num_experts, cfg.router_noise_std)
        experts: list[nn.Module] = [CrossModalExpert(dim, cfg, gated) for _ in range(cfg.num_cross_experts)]
        experts += [UnimodalExpert(dim, cfg, gated) for _ in range(cfg.num_uni_experts)]
        self.experts = nn.ModuleList(experts)

    def forward(self, x: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = self.token_map(other)  # (M, N, C)
        weights = self.router(x, y)  # (M, E)
        out: Optional[Tensor] = None
        for e, expert in enumerate(self.experts):
            coef = weights[:, e] if expert.gate is None else weights[:, e] * expert.gate  # (M,)
            h = expert(x, y)  # (M, N, C)
            coef = coef[:, None, None]
            out = h * coef if out is None else torch.addcmul(out, h, coef)
        return out, weights, load_balance_loss(weights)
