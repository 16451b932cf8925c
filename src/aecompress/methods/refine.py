"""Refinement of a decomposition's factors by the paper's AE loss (Kronecker, Tucker)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pydantic import Field
from tqdm.auto import tqdm

from aecompress.methods.base import MethodOptions
from aecompress.methods.losses import LossConfig, powered_l1_alpha, reconstruction_loss


class RefineOptions(MethodOptions):
    """`steps` full-batch Adam steps at `lr` on the AE loss of the rows (0: no refinement)."""

    steps: int = Field(300, ge=0)
    lr: float = Field(1e-4, gt=0)
    loss: LossConfig = Field(default_factory=LossConfig)


def refine(
    factors: Sequence[torch.Tensor],
    decode: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    target: torch.Tensor,
    options: RefineOptions,
    *,
    desc: str = "refine",
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
    for step in tqdm(range(options.steps + 1), desc=desc, disable=not progress, leave=False):
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
