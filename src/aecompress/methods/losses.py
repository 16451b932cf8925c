"""The reconstruction loss of the paper's AE, and the refinement of a decomposition's
factors by it (Kronecker, Tucker).

w_cos * mean cosine distance (1 - cos(w, w_hat)) + w_rmse * RMSE over elements
[+ w_l1 * mean (|w - w_hat| + 1e-10)^alpha], with optional per-row importance weights
(normalised to sum 1 in the batch) in place of the plain means. Defaults are the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from aecompress.methods.base import MethodOptions
from aecompress.progress import progress_bar


class LossConfig(BaseModel):
    """Weights of the loss terms; `l1_weight` > 0 adds the powered L1 term."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cosine_weight: float = Field(0.9091, ge=0)
    rmse_weight: float = Field(0.0909, ge=0)
    l1_weight: float = Field(0.0, ge=0)
    l1_alpha_start: float = Field(1.0, gt=0)
    l1_alpha_end: float = Field(0.1, gt=0)


def powered_l1_alpha(config: LossConfig, epoch: int, epochs: int) -> float:
    """Alpha of the powered L1 term, decaying linearly from start to end over training."""
    if epochs <= 1:
        return config.l1_alpha_start
    step = (config.l1_alpha_end - config.l1_alpha_start) / (epochs - 1)
    return config.l1_alpha_start + step * epoch


def reconstruction_loss(
    target: torch.Tensor,
    decoded: torch.Tensor,
    config: LossConfig,
    row_weights: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """The loss over a batch of rows [batch, m] (scalar).

    Row terms are averaged with `row_weights` (normalised to sum 1; uniform if None); the
    RMSE is the square root of the (weighted) mean squared element error.
    """
    if row_weights is None:
        weights = torch.full(
            (target.shape[0],), 1 / target.shape[0], dtype=target.dtype, device=target.device
        )
    else:
        weights = row_weights / row_weights.sum()
    error = target - decoded
    cosine = 1 - F.cosine_similarity(target, decoded, dim=1, eps=1e-8)
    loss = config.cosine_weight * (weights * cosine).sum()
    loss = loss + config.rmse_weight * (weights * error.pow(2).mean(dim=1)).sum().sqrt()
    if config.l1_weight > 0:
        powered = (error.abs() + 1e-10).pow(alpha).mean(dim=1)
        loss = loss + config.l1_weight * (weights * powered).sum()
    return loss


class RefineOptions(MethodOptions):
    """`steps` full-batch Adam steps at `lr` on the AE loss of the rows (0: no refinement)."""

    steps: int = Field(300, ge=0)
    lr: float = Field(1e-4, gt=0)
    loss: LossConfig = Field(default_factory=LossConfig)


def refine_factors(
    factors: Sequence[torch.Tensor],
    decode: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    target: torch.Tensor,
    options: RefineOptions,
    *,
    desc: str = "refine factors",
    progress: bool = True,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Adam on copies of `factors` minimising the AE loss between the rows of `target`
    [rows, m] and of decode(factors); returns the best factors seen and the losses.

    The best is judged by the loss without its powered-L1 term (whose alpha changes
    from step to step), the initial factors included: refinement never makes it worse.
    """
    params = [f.detach().clone().float().requires_grad_(True) for f in factors]
    target = target.float()
    fixed = options.loss.model_copy(update={"l1_weight": 0.0})
    optimizer = torch.optim.Adam(params, lr=options.lr)
    best_loss, best = float("inf"), [p.detach().clone() for p in params]
    initial = None
    for step in progress_bar(range(options.steps + 1), desc=desc, enabled=progress):
        decoded = decode(params)
        with torch.no_grad():
            judged = reconstruction_loss(target, decoded, fixed).item()
        initial = judged if initial is None else initial
        if judged < best_loss:
            best_loss, best = judged, [p.detach().clone() for p in params]
        if step == options.steps:
            break
        alpha = powered_l1_alpha(options.loss, step, options.steps)
        loss = reconstruction_loss(target, decoded, options.loss, alpha=alpha)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert initial is not None
    return best, {"loss_initial": initial, "loss_final": best_loss}
