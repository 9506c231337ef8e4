"""iTransformer (Liu et al., "iTransformer: Inverted Transformers Are Effective for Time Series
Forecasting", ICLR 2024), written from the paper's description, with tickcast's forecast heads.

The paper's architecture, kept as described:
- per-window normalisation of every variate over the lookback (subtract the window mean, divide by
  the window standard deviation: population variance plus a small floor, see EPS_VAR), and
  de-normalisation of the outputs
  with the statistics of the variate they forecast;
- inverted embedding: each variate's whole lookback series becomes ONE token, Linear(L -> d_model);
  optional time-feature tokens (here the time-of-day / day-of-week variates) are embedded the same
  way but are not normalised, as in the paper's reference implementation;
- an encoder of ``e_layers`` blocks, each post-norm: x = LN(x + Dropout(MHA(x, x, x))) with the
  attention across variate tokens; x = LN(x + Dropout(FFN(x))) with a position-wise two-layer
  feed-forward network (d_model -> d_ff -> d_model); a final LayerNorm after the last block;
- a linear projector from each token (d_model) to that variate's future.

``PaperITransformer`` is that model verbatim (projector Linear(d_model -> S), per-variate MSE), used
by ``model.paper_check``. ``ITransformer`` puts tickcast's heads on the same encoder: the projector
reads the token of the variate whose future is the target (``log_return_1m`` for the close path,
realised volatility and direction; ``range_rel_1m`` for the range) and emits quantiles in that
variate's normalised units; de-normalisation multiplies by the window's scale of that variate:

- close path:  q_h = sigma_r * sqrt(h) * z_h   (sigma_r = window std of 1-min log returns; the
  window mean is not added back: a drift fitted on a few hours of returns is noise)
- realised vol: q = sigma_r * sqrt(H) * z
- range:        q = mean(range_rel_1m) * sqrt(H) * z

Quantiles never cross: the median is free and the outer quantiles are median -/+ softplus
increments (strictly positive for rv and range: softplus base + softplus increments). The direction
head also sees log(sigma_r * sqrt(H) / flat_threshold), because the probability of a "flat" move
depends on the absolute volatility that per-window normalisation removes from the tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

# The paper adds 1e-5 to the variance of data that was standardised beforehand; tickcast feeds raw
# variates spanning 1e-4 (returns) to 1e5 (prices), so the floor is scale-aware:
# var + EPS_VAR * (1 + mean^2), negligible for every real variate, and safe for a constant one.
EPS_VAR = 1e-10
SCALE_FLOOR = 1e-6


@dataclass
class ModelConfig:
    variates: list[str]
    lookback: int = 240
    horizon: int = 30
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    d_model: int = 64
    n_heads: int = 4
    e_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    activation: str = "gelu"
    time_variates: list[str] = field(default_factory=lambda: ["tod_sin", "tod_cos", "dow_sin", "dow_cos"])
    use_time_tokens: bool = True
    return_variate: str = "log_return_1m"
    range_variate: str = "range_rel_1m"
    flat_threshold: float = 0.001
    feed_scale_to_heads: bool = True
    # an extra token carrying the normalisation statistics (the "de-stationary factors" of the
    # authors' Non-stationary Transformer): per value variate mean/std and log(std / sigma_r), and
    # log(sigma_r); per-variate normalisation alone hides how the variates' scales relate
    stat_token: bool = False
    # learned log-linear de-normalisation ("HAR-style" scale): each target's scale is the paper's
    # window-statistic scale times exp(a linear function of log vol ratios known at t: the last and
    # window-mean values of ``scale_variates`` relative to sigma_r, and log sigma_r); zero-initialised,
    # so training starts from the paper's de-normalisation
    learned_scale: bool = False
    scale_variates: list[str] = field(default_factory=lambda: ["rv_15m", "rv_60m", "parkinson_15m", "range_rel_1m"])
    # intraday seasonality of the scale: harmonics k = 1..n of the minute of day at t (from the
    # tod_sin / tod_cos variates of the last row) and the day of week, added to the learned-scale
    # features (the future window's harmonics are linear in these, so one linear map serves every h)
    time_harmonics: int = 0
    # EWMA volatilities of the window's 1-min returns (half-lives in minutes) as learned-scale features
    ewma_halflives: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


PAPER_EPS_VAR = 1e-5  # the paper's floor, for data standardised beforehand (model.paper_check)


def per_window_norm(x: torch.Tensor, eps_var: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, L, N] -> (normalised x, mean [B, 1, N], std [B, 1, N]) over the time axis. The variance
    floor is the scale-aware ``EPS_VAR * (1 + mean^2)``, or a plain ``eps_var`` (the paper's 1e-5)."""
    mean = x.mean(dim=1, keepdim=True)
    xc = x - mean
    floor = EPS_VAR * (1.0 + mean * mean) if eps_var is None else eps_var
    std = torch.sqrt((xc * xc).mean(dim=1, keepdim=True) + floor)
    return xc / std, mean, std


class EncoderLayer(nn.Module):
    """Post-norm Transformer block over variate tokens: attention, then position-wise FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.act = F.gelu if activation == "gelu" else F.relu

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D // h)
        attn = self.drop(torch.softmax(scores, dim=-1))
        y = torch.matmul(attn, v).transpose(1, 2).reshape(B, N, D)
        return self.out(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attention(x)))
        y = self.ff2(self.drop(self.act(self.ff1(x))))
        return self.norm2(x + self.drop(y))


class Encoder(nn.Module):
    def __init__(self, cfg_d_model: int, n_heads: int, e_layers: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg_d_model, n_heads, d_ff, dropout, activation)
                                    for _ in range(e_layers))
        self.norm = nn.LayerNorm(cfg_d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class InvertedEmbedding(nn.Module):
    """Each variate's whole lookback series -> one token: Linear(L -> d_model) + dropout."""

    def __init__(self, lookback: int, d_model: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(lookback, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, L, N] -> [B, N, d]
        return self.drop(self.proj(x.transpose(1, 2)))


class PaperITransformer(nn.Module):
    """The paper's forecaster: normalise, embed variates (+ time tokens), encode, project each
    variate token to S future values, de-normalise with the variate's window statistics."""

    def __init__(self, n_variates: int, lookback: int, pred_len: int, d_model: int = 512, n_heads: int = 8,
                 e_layers: int = 2, d_ff: int = 512, dropout: float = 0.1, activation: str = "gelu",
                 use_norm: bool = True):
        super().__init__()
        self.n_variates = n_variates
        self.use_norm = use_norm
        self.embed = InvertedEmbedding(lookback, d_model, dropout)
        self.encoder = Encoder(d_model, n_heads, e_layers, d_ff, dropout, activation)
        self.projector = nn.Linear(d_model, pred_len)

    def forward(self, x: torch.Tensor, x_mark: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_norm:
            x, mean, std = per_window_norm(x, PAPER_EPS_VAR)  # the paper's floor: inputs are standardised
        tokens_in = x if x_mark is None else torch.cat([x, x_mark], dim=2)
        enc = self.encoder(self.embed(tokens_in))
        y = self.projector(enc).transpose(1, 2)[:, :, : self.n_variates]  # [B, S, N]
        if self.use_norm:
            y = y * std + mean
        return y


def _monotone_symmetric(a: torch.Tensor, mid: int) -> torch.Tensor:
    """[..., Q] raw -> non-crossing quantiles: a[mid] is the median; below it cumulative
    -softplus steps, above it cumulative +softplus steps."""
    med = a[..., mid:mid + 1]
    lower = a[..., :mid]
    upper = a[..., mid + 1:]
    down = torch.flip(torch.cumsum(torch.flip(F.softplus(lower), dims=[-1]), dim=-1), dims=[-1])
    up = torch.cumsum(F.softplus(upper), dim=-1)
    return torch.cat([med - down, med, med + up], dim=-1)


def _bounded_exp(a: torch.Tensor, bound: float = 3.0) -> torch.Tensor:
    """exp(bound * tanh(a / bound)): a multiplier in [e^-3, e^3], exp(a) near zero; never overflows."""
    return torch.exp(bound * torch.tanh(a / bound))


def _monotone_positive(a: torch.Tensor) -> torch.Tensor:
    """[..., Q] raw -> strictly positive increasing quantiles (softplus base + softplus steps)."""
    return torch.cumsum(F.softplus(a), dim=-1) + 1e-6


class ITransformer(nn.Module):
    """iTransformer encoder with tickcast's quantile and direction heads (see the module doc).

    ``forward(x)`` takes raw windows ``[B, L, V]`` (variates in ``cfg.variates`` order, time
    variates included) and returns (close_logret_q [B,H,Q], rv_q [B,Q], range_rel_q [B,Q],
    direction_p [B,3]) in raw target units. ``forward_scaled`` returns the normalised quantiles
    and the scales, which training uses for the loss.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V = len(cfg.variates)
        time_set = set(cfg.time_variates) if cfg.use_time_tokens else set()
        self.value_idx = [i for i, v in enumerate(cfg.variates) if v not in time_set]
        self.time_idx = [i for i, v in enumerate(cfg.variates) if v in time_set]
        if cfg.return_variate not in cfg.variates or cfg.range_variate not in cfg.variates:
            raise ValueError(f"variates must include {cfg.return_variate} and {cfg.range_variate} "
                             "(the tokens the heads read)")
        if V == 0 or not self.value_idx:
            raise ValueError("no value variates")
        self.ret_tok = self.value_idx.index(cfg.variates.index(cfg.return_variate))
        self.rng_tok = self.value_idx.index(cfg.variates.index(cfg.range_variate))
        self.register_buffer("value_sel", torch.tensor(self.value_idx, dtype=torch.long), persistent=False)
        self.register_buffer("time_sel", torch.tensor(self.time_idx, dtype=torch.long), persistent=False)
        H, Q = cfg.horizon, len(cfg.quantiles)
        qs = list(cfg.quantiles)
        if sorted(qs) != qs or 0.5 not in qs:
            raise ValueError("quantiles must be ascending and include 0.5")
        self.mid = qs.index(0.5)
        self.embed = InvertedEmbedding(cfg.lookback, cfg.d_model, cfg.dropout)
        self.encoder = Encoder(cfg.d_model, cfg.n_heads, cfg.e_layers, cfg.d_ff, cfg.dropout, cfg.activation)
        self.stat_embed = nn.Linear(2 * len(self.value_idx) + 1, cfg.d_model) if cfg.stat_token else None
        self.scale_idx = [self.value_idx.index(cfg.variates.index(v)) for v in cfg.scale_variates
                          if v in cfg.variates and cfg.variates.index(v) in self.value_idx]
        self.register_buffer("scale_sel", torch.tensor(self.scale_idx, dtype=torch.long), persistent=False)
        tv = cfg.variates
        self.tod_idx = (tv.index("tod_sin"), tv.index("tod_cos")) if {"tod_sin", "tod_cos"} <= set(tv) else None
        self.dow_idx = (tv.index("dow_sin"), tv.index("dow_cos")) if {"dow_sin", "dow_cos"} <= set(tv) else None
        self.n_harm = cfg.time_harmonics if (cfg.learned_scale and self.tod_idx is not None) else 0
        hl = list(cfg.ewma_halflives) if cfg.learned_scale else []
        k = torch.arange(cfg.lookback - 1, -1, -1, dtype=torch.float32)  # age of each row, newest = 0
        ew = torch.stack([torch.pow(0.5, k / h) for h in hl], dim=1) if hl else torch.zeros(cfg.lookback, 0)
        self.register_buffer("ewma_w", ew / ew.sum(0, keepdim=True).clamp(min=1e-12), persistent=False)
        if cfg.learned_scale:
            n_feat = (2 * len(self.scale_idx) + 2 + 2 * self.n_harm + (2 if self.n_harm and self.dow_idx else 0)
                      + len(hl))
            self.scale_path = nn.Linear(n_feat, H)
            self.scale_rv = nn.Linear(n_feat, 1)
            self.scale_range = nn.Linear(n_feat, 1)
            for lin in (self.scale_path, self.scale_rv, self.scale_range):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        extra = 1 if cfg.feed_scale_to_heads else 0
        self.head_path = nn.Linear(cfg.d_model + extra, H * Q)
        self.head_rv = nn.Linear(cfg.d_model + extra, Q)
        self.head_range = nn.Linear(cfg.d_model + extra, Q)
        self.head_dir = nn.Linear(cfg.d_model + 1, 3)
        self.register_buffer("sqrt_h", torch.sqrt(torch.arange(1, H + 1, dtype=torch.float32)), persistent=False)
        with torch.no_grad():  # start near sensible values: median 0, outer quantiles ~ +-1.3 sigma
            self.head_path.bias.view(H, Q)[:, :] = 0.5
            self.head_path.bias.view(H, Q)[:, self.mid] = 0.0
            self.head_rv.bias.fill_(0.0)
            self.head_range.bias.fill_(0.5)

    def forward_scaled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        H, Q = cfg.horizon, len(cfg.quantiles)
        x = x[:, x.shape[1] - cfg.lookback:]  # an ensemble may feed a longer window: use the newest rows
        xv = x.index_select(2, self.value_sel)
        xn, mean, std = per_window_norm(xv)
        if self.time_idx:
            xn = torch.cat([xn, x.index_select(2, self.time_sel)], dim=2)
        tokens = self.embed(xn)  # [B, N(+T), d]
        sigma_r = torch.clamp(std[:, 0, self.ret_tok], min=SCALE_FLOOR)  # [B]
        if self.stat_embed is not None:
            m, sd = mean[:, 0], std[:, 0]
            stats = torch.cat([torch.clamp(m / sd, -10.0, 10.0),
                               torch.log(sd) - torch.log(sigma_r).unsqueeze(1),
                               (torch.log(sigma_r) - math.log(cfg.flat_threshold)).unsqueeze(1)], dim=1)
            tokens = torch.cat([tokens, self.stat_embed(stats).unsqueeze(1)], dim=1)
        enc = self.encoder(tokens)
        ret_tok = enc[:, self.ret_tok]
        rng_tok = enc[:, self.rng_tok]
        rng_mean = torch.clamp(mean[:, 0, self.rng_tok].abs(), min=SCALE_FLOOR)
        sqrt_H = math.sqrt(H)
        log_scale = torch.log(sigma_r * sqrt_H / cfg.flat_threshold).unsqueeze(1)  # [B, 1]
        if cfg.feed_scale_to_heads:
            ret_in = torch.cat([ret_tok, log_scale], dim=1)
            rng_in = torch.cat([rng_tok, torch.log(rng_mean * sqrt_H / cfg.flat_threshold).unsqueeze(1)], dim=1)
        else:
            ret_in, rng_in = ret_tok, rng_tok
        z_path = _monotone_symmetric(self.head_path(ret_in).view(-1, H, Q), self.mid)
        z_rv = _monotone_positive(self.head_rv(ret_in))
        z_range = _monotone_positive(self.head_range(rng_in))
        logits = self.head_dir(torch.cat([ret_tok, log_scale], dim=1))
        if cfg.learned_scale:
            # multipliers relative to the (fixed) paper scales, so that the loss stays in fixed units
            log_sr = torch.log(sigma_r).unsqueeze(1)
            sel = xv.index_select(2, self.scale_sel) if self.scale_idx else None
            feats = [log_sr - math.log(cfg.flat_threshold), torch.log(rng_mean).unsqueeze(1) - log_sr]
            if sel is not None:
                feats += [torch.log(torch.clamp(sel[:, -1], min=1e-8)) - log_sr,
                          torch.log(torch.clamp(sel.mean(dim=1), min=1e-8)) - log_sr]
            if self.ewma_w.shape[1]:
                r = xv[:, :, self.ret_tok]
                ewv = torch.matmul(r * r, self.ewma_w)  # [B, n_halflives] EWMA of squared returns
                feats.append(0.5 * torch.log(ewv + 1e-14) - log_sr)
            if self.n_harm:
                s1, c1 = x[:, -1, self.tod_idx[0]], x[:, -1, self.tod_idx[1]]
                sk, ck = s1, c1
                for _ in range(self.n_harm):
                    feats += [sk.unsqueeze(1), ck.unsqueeze(1)]
                    sk, ck = sk * c1 + ck * s1, ck * c1 - sk * s1  # angle addition: (k+1) theta
                if self.dow_idx is not None:
                    feats += [x[:, -1, self.dow_idx[0]].unsqueeze(1), x[:, -1, self.dow_idx[1]].unsqueeze(1)]
            f = torch.cat(feats, dim=1)
            z_path = z_path * _bounded_exp(self.scale_path(f)).unsqueeze(-1)
            z_rv = z_rv * _bounded_exp(self.scale_rv(f))
            z_range = z_range * _bounded_exp(self.scale_range(f))
        return {
            "z_path": z_path, "z_rv": z_rv, "z_range": z_range, "logits": logits,
            "scale_path": sigma_r.unsqueeze(1) * self.sqrt_h.unsqueeze(0),  # [B, H]
            "scale_rv": sigma_r * sqrt_H, "scale_range": rng_mean * sqrt_H,
        }

    def forward(self, x: torch.Tensor):
        o = self.forward_scaled(x)
        close_q = o["z_path"] * o["scale_path"].unsqueeze(-1)
        rv_q = o["z_rv"] * o["scale_rv"].unsqueeze(-1)
        range_q = o["z_range"] * o["scale_range"].unsqueeze(-1)
        return close_q, rv_q, range_q, torch.softmax(o["logits"], dim=-1)


class Ensemble(nn.Module):
    """Mean of members' quantiles (a mean of sorted vectors stays sorted) and probabilities."""

    def __init__(self, members: list[ITransformer]):
        super().__init__()
        self.members = nn.ModuleList(members)
        # members may differ in size and lookback; the ensemble reads the longest window
        self.cfg = max((m.cfg for m in members), key=lambda c: c.lookback)

    def forward(self, x: torch.Tensor):
        outs = [m(x) for m in self.members]
        return tuple(torch.stack([o[i] for o in outs]).mean(0) for i in range(4))


def target_scaling_doc(cfg: ModelConfig) -> dict:
    return {
        "close_logret_q": "window std of log_return_1m * sqrt(h) * z (window mean not added)",
        "rv_q": "window std of log_return_1m * sqrt(H) * z",
        "range_rel_q": "window mean of range_rel_1m * sqrt(H) * z",
        "loss": "pinball on z (targets divided by the same scales)",
        "undone_in_graph": True,
    }


def normalisation_doc(cfg: ModelConfig) -> dict:
    return {"kind": "per_window_revin", "axis": "time", "std": "sqrt(var + eps_var * (1 + mean^2))",
            "eps_var": EPS_VAR,
            "time_tokens_unnormalised": [v for v in cfg.variates if v in set(cfg.time_variates)]
            if cfg.use_time_tokens else []}
