"""soft_cross_entropy against torch for several batch sizes, label smoothing and distillation temperature."""

import pytest
import torch
import torch.nn.functional as F

from lmsys.modeling.losses import soft_cross_entropy

BATCH_SIZES = [1, 2, 3, 7, 16]


def random_case(n: int, seed: int, soft: bool):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=g) * 3
    if soft:
        targets = torch.softmax(torch.randn(n, 3, generator=g) * 2, -1)
    else:
        targets = F.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float()
    return logits, targets


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("soft", [False, True])
def test_matches_torch_cross_entropy(n, soft):
    logits, targets = random_case(n, n, soft)
    torch.testing.assert_close(soft_cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    torch.testing.assert_close(soft_cross_entropy(logits, targets, reduction="sum"),
                               F.cross_entropy(logits, targets, reduction="sum"))
    torch.testing.assert_close(soft_cross_entropy(logits, targets, reduction="none"),
                               F.cross_entropy(logits, targets, reduction="none"))
    if not soft:  # one-hot targets are class indices
        torch.testing.assert_close(soft_cross_entropy(logits, targets), F.cross_entropy(logits, targets.argmax(-1)))


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("smoothing", [0.05, 0.1, 0.3])
def test_label_smoothing_matches_torch(n, smoothing):
    logits, targets = random_case(n, 100 + n, soft=False)
    torch.testing.assert_close(soft_cross_entropy(logits, targets, label_smoothing=smoothing),
                               F.cross_entropy(logits, targets.argmax(-1), label_smoothing=smoothing))


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_gradient_is_softmax_minus_target_over_n(n):
    logits, targets = random_case(n, 200 + n, soft=True)
    logits.requires_grad_(True)
    soft_cross_entropy(logits, targets).backward()
    torch.testing.assert_close(logits.grad, (torch.softmax(logits.detach(), -1) - targets) / n)


def test_mean_over_micro_batches_equals_the_whole_batch():
    # The loop sums per-pair losses of uneven micro-batches and divides by the update's pair count.
    logits, targets = random_case(7, 5, soft=True)
    parts = [(0, 1), (1, 4), (4, 7)]
    total = sum(soft_cross_entropy(logits[a:b], targets[a:b], reduction="sum") for a, b in parts) / 7
    torch.testing.assert_close(total, soft_cross_entropy(logits, targets))


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_distillation_temperature(temperature):
    logits, teacher = random_case(5, 9, soft=True)
    softened = teacher ** (1 / temperature)
    softened = softened / softened.sum(-1, keepdim=True)
    expected = -(softened * F.log_softmax(logits / temperature, -1)).sum(-1).mean() * temperature**2
    torch.testing.assert_close(soft_cross_entropy(logits, teacher, temperature=temperature), expected)
    # equal to T^2 KL(teacher_T || student_T) plus the teacher's entropy term, which has no gradient
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), softened, reduction="batchmean") * temperature**2
    entropy = -(softened * softened.log()).sum(-1).mean() * temperature**2
    torch.testing.assert_close(soft_cross_entropy(logits, teacher, temperature=temperature), kl + entropy)


def test_temperature_keeps_zero_probabilities_at_zero():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    one_hot = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot, temperature=2.0),
                               F.cross_entropy(logits / 2.0, one_hot) * 4.0)


def test_low_precision_logits_are_computed_in_float32():
    logits, targets = random_case(4, 3, soft=True)
    loss = soft_cross_entropy(logits.bfloat16(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.bfloat16().float(), targets))


def test_uniform_prediction_costs_ln3():
    targets = F.one_hot(torch.tensor([0, 1, 2, 2]), 3).float()
    torch.testing.assert_close(soft_cross_entropy(torch.zeros(4, 3), targets), torch.log(torch.tensor(3.0)))
