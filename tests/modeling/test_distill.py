"""Knowledge distillation through `loss.distill_temperature`: soft_cross_entropy with temperature T is
T^2 * KL(teacher_T || student_T) plus a term that does not depend on the student, so its gradient is the KD one."""

import pytest
import torch
import torch.nn.functional as F

from lmsys.modeling.losses import soft_cross_entropy


def teacher_and_student(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits and student logits, (n, 3) each."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) * 2, torch.randn(n, 3, generator=g, dtype=torch.float64) * 2


def kd_loss(student: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook KD loss: T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over pairs."""
    teacher_t = F.softmax(teacher_logits / temperature, -1)
    return F.kl_div(F.log_softmax(student / temperature, -1), teacher_t, reduction="batchmean") * temperature**2


@pytest.mark.parametrize("n", [1, 4, 9])
def test_temperature_one_is_soft_cross_entropy(n):
    teacher, student = teacher_and_student(n, n)
    probs = F.softmax(teacher, -1)
    expected = -(probs * F.log_softmax(student, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(student, probs), expected.float())
    torch.testing.assert_close(soft_cross_entropy(student, probs, temperature=1.0), F.cross_entropy(student.float(), probs.float()))


@pytest.mark.parametrize("temperature", [1.5, 2.0, 4.0])
def test_temperature_is_kd_up_to_a_student_independent_constant(temperature):
    """The teacher's probabilities softened to p^(1/T) are softmax(teacher_logits / T): the same teacher_T."""
    teacher, _ = teacher_and_student(6, 0)
    probs = F.softmax(teacher, -1)
    gaps = []
    for seed in (1, 2, 3):
        _, student = teacher_and_student(6, seed)
        gaps.append(soft_cross_entropy(student, probs, temperature=temperature).double() - kd_loss(student, teacher, temperature))
    teacher_t = F.softmax(teacher / temperature, -1)
    entropy = -(teacher_t * teacher_t.log()).sum(-1).mean() * temperature**2  # the constant: T^2 H(teacher_T)
    for gap in gaps:
        torch.testing.assert_close(gap, entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_gradient_matches_kl_div(temperature):
    teacher, student = teacher_and_student(5, 7)
    ours = student.clone().float().requires_grad_(True)
    soft_cross_entropy(ours, F.softmax(teacher, -1).float(), temperature=temperature).backward()
    reference = student.clone().requires_grad_(True)
    kd_loss(reference, teacher, temperature).backward()
    torch.testing.assert_close(ours.grad.double(), reference.grad, atol=1e-6, rtol=1e-5)
    # The closed form: T * (softmax(student / T) - teacher_T) / N
    closed = temperature * (F.softmax(student / temperature, -1) - F.softmax(teacher / temperature, -1)) / len(student)
    torch.testing.assert_close(reference.grad, closed)
