"""Soft-target cross-entropy on (A, B, tie) targets: one-hot, smoothed, pseudo-label or teacher probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of logits (N, 3) against target probabilities (N, 3).

    `label_smoothing` mixes the targets with the uniform distribution. A `temperature` T != 1 is knowledge
    distillation: targets are treated as teacher probabilities softened to p^(1/T), logits divided by T, and the
    loss scaled by T^2 so that gradient magnitudes stay comparable (equal to the KL divergence up to a constant).
    """
    targets = targets.to(torch.float32)
    n_classes = logits.shape[-1]
    if temperature != 1.0:
        softened = targets.clamp_min(1e-12).pow(1.0 / temperature) * (targets > 0)
        targets = softened / softened.sum(-1, keepdim=True)
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / n_classes
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    per_pair = -(targets * log_probs).sum(-1) * temperature**2  # (N,)
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "none":
        return per_pair
    return per_pair.mean()
