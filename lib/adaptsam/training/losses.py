"""The training loss of one decoding round: BCE + soft Dice on the low-res logits, plus the IoU
head's error (the server's propagation trusts the predicted IoU to know when to stop)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def round_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, iou_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, hard Dice per sample) for logits and target of shape (B, 1, L, L)."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2, 3))
    soft_dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))
    with torch.no_grad():
        hard, truth = logits > 0, target > 0
        inter_n = (hard & truth).sum((1, 2, 3)).float()
        true_iou = inter_n / ((hard | truth).sum((1, 2, 3)).float() + 1e-6)
        hard_dice = 2 * inter_n / (hard.sum((1, 2, 3)) + truth.sum((1, 2, 3)) + 1e-6)
    loss = (bce + soft_dice).mean() + iou_weight * F.mse_loss(iou_pred[:, 0], true_iou)
    return loss, hard_dice
