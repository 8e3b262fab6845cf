"""The preference loss with teacher terms: (ce * CE + kl * T^2 KL + cos * (1 - cos)) / sum of weights, against
torch.nn.functional, and a student trained on the KL term alone moving to the teacher's distribution."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmsys.data.schema import Pair, swap_pair
from lmsys.modeling.losses import LossWeights, preference_loss, soft_cross_entropy


def batch(n: int, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, classes, generator=generator) * 2
    teacher = torch.randn(n, classes, generator=generator) * 2
    labels = torch.randint(0, classes, (n,), generator=generator)
    return student, teacher, labels, F.one_hot(labels, classes).float()


@pytest.mark.parametrize("n,classes", [(1, 3), (7, 3), (16, 2)])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 2.0])
def test_matches_torch_functional(n, classes, temperature):
    student, teacher, labels, targets = batch(n, classes)
    weights = LossWeights(ce_weight=0.5, kl_weight=1.0, cosine_weight=1.0, kl_temperature=temperature)
    ce = F.cross_entropy(student, labels)
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    cosine = (1 - F.cosine_similarity(F.softmax(student, -1), F.softmax(teacher, -1), dim=-1)).mean()
    expected = (0.5 * ce + kl + cosine) / 2.5  # the WSDM 1st-place weighting
    torch.testing.assert_close(preference_loss(student, targets, teacher, weights), expected)
    total = preference_loss(student, targets, teacher, weights, reduction="sum")
    torch.testing.assert_close(total / n, expected)


def test_labels_only_is_soft_cross_entropy_and_a_teacher_is_required_for_kl():
    student, teacher, _, targets = batch(5)
    torch.testing.assert_close(preference_loss(student, targets, None, LossWeights()), soft_cross_entropy(student, targets))
    torch.testing.assert_close(preference_loss(student, targets, teacher, LossWeights(ce_weight=2.0)),
                               soft_cross_entropy(student, targets))  # divided by the sum of the weights
    with pytest.raises(ValueError, match="teacher logits"):
        preference_loss(student, targets, None, LossWeights(kl_weight=1.0))


def test_a_student_trained_only_on_the_kl_term_moves_to_the_teacher():
    _, teacher, _, targets = batch(32, seed=1)
    student = torch.zeros(32, 3, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=2.0)
    weights = LossWeights(ce_weight=0.0, kl_weight=1.0, kl_temperature=2.0)
    gaps = []
    for _ in range(300):
        gaps.append((F.softmax(student, -1) - F.softmax(teacher, -1)).abs().max().item())
        optimizer.zero_grad()
        preference_loss(student, targets, teacher, weights).backward()  # the labels have no weight
        optimizer.step()
    assert gaps[0] > 0.3 and gaps[-1] < 0.01


def test_swapping_a_pair_swaps_its_teacher_logits():
    pair = Pair("1", ("q",), ("a",), ("b",), target=(1.0, 0.0, 0.0), teacher_logits=(2.0, -1.0, 0.5))
    swapped = swap_pair(pair)
    assert swapped.teacher_logits == (-1.0, 2.0, 0.5) and swapped.target == (0.0, 1.0, 0.0)
    two_class = swap_pair(Pair("2", ("q",), ("a",), ("b",), target=(0.2, 0.8), teacher_logits=(0.1, 0.3)))
    assert two_class.teacher_logits == (0.3, 0.1) and np.allclose(two_class.target, (0.8, 0.2))
