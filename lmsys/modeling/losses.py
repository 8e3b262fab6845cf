"""The preference loss: soft-target cross-entropy on (A, B[, tie]) targets (one-hot, smoothed, pseudo-label
probabilities), plus the distillation terms against teacher logits (KL at a temperature, cosine)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class LossWeights:
    """The terms of the preference loss and their settings (from the `loss` config section)."""

    ce_weight: float = 1.0
    kl_weight: float = 0.0
    cosine_weight: float = 0.0
    kl_temperature: float = 1.0
    label_smoothing: float = 0.0
    distill_temperature: float = 1.0  # of the soft-label CE term (see soft_cross_entropy)

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.cosine_weight > 0


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per row (N,): the T^2 keeps the gradient scale of
    the soft term comparable across temperatures (Hinton et al.)."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * temperature**2


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(p_student, p_teacher) between the probability vectors, per row (N,)."""
    return 1.0 - F.cosine_similarity(F.softmax(student.float(), -1), F.softmax(teacher.float(), -1), dim=-1)


def preference_loss(
    logits: torch.Tensor,  # (N, C) student
    targets: torch.Tensor,  # (N, C) label probabilities
    teacher_logits: torch.Tensor | None,  # (N, C), or None when the weights need no teacher
    weights: LossWeights,
    reduction: str = "mean",
) -> torch.Tensor:
    """(ce_weight * CE(labels) + kl_weight * T^2 KL(teacher || student at T) + cosine_weight * (1 - cos)) divided
    by the sum of the weights; with only labels (the default weights) it is `soft_cross_entropy`."""
    per_pair = weights.ce_weight * soft_cross_entropy(logits, targets, weights.label_smoothing,
                                                      weights.distill_temperature, reduction="none")
    if weights.needs_teacher:
        if teacher_logits is None:
            raise ValueError("loss.kl_weight / loss.cosine_weight need teacher logits in the training data")
        per_pair = per_pair + weights.kl_weight * distillation_kl(logits, teacher_logits, weights.kl_temperature)
        per_pair = per_pair + weights.cosine_weight * cosine_distance(logits, teacher_logits)
    per_pair = per_pair / (weights.ce_weight + weights.kl_weight + weights.cosine_weight)
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "none":
        return per_pair
    return per_pair.mean()
