"""Training losses (torch): pinball for quantiles, cross-entropy for direction."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def pinball_loss(y: torch.Tensor, q: torch.Tensor, taus: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pinball loss. ``q`` [..., Q], ``y`` broadcastable to q[..., 0], ``taus`` [Q];
    ``weight`` (optional) broadcastable to y, e.g. the target scale to weight like raw units."""
    d = y.unsqueeze(-1) - q
    loss = torch.maximum(taus * d, (taus - 1.0) * d)
    if weight is not None:
        loss = loss * weight.unsqueeze(-1)
    return loss.mean()


def direction_loss(logits: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (down, flat, up); ``direction`` holds -1/0/1."""
    return F.cross_entropy(logits, (direction + 1).long())


def forecast_loss(out: dict, y: dict, taus: torch.Tensor, weights: dict, raw_weighting: bool = False) -> dict:
    """Pinball on the normalised quantiles against targets divided by the same per-window scales;
    with ``raw_weighting`` each row is weighted by its scale (relative to the batch mean), which makes
    the loss proportional to the pinball in raw units."""
    sp, srv, srg = out["scale_path"], out["scale_rv"], out["scale_range"]
    wp = sp / sp.mean() if raw_weighting else None
    wr = srv / srv.mean() if raw_weighting else None
    wg = srg / srg.mean() if raw_weighting else None
    l_path = pinball_loss(y["path"] / sp, out["z_path"], taus, wp)
    l_rv = pinball_loss(y["rv"] / srv, out["z_rv"], taus, wr)
    l_rng = pinball_loss(y["range_rel"] / srg, out["z_range"], taus, wg)
    l_dir = direction_loss(out["logits"], y["direction"])
    total = (weights.get("path", 1.0) * l_path + weights.get("rv", 1.0) * l_rv
             + weights.get("range", 1.0) * l_rng + weights.get("direction", 0.2) * l_dir)
    return {"total": total, "path": l_path.detach(), "rv": l_rv.detach(), "range": l_rng.detach(),
            "direction": l_dir.detach()}
