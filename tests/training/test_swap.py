"""Swapping A and B: the single mapping of targets and outputs, the encoded swapped orientation, and the training
plan's swap augmentation ("full" puts both orientations of a pair in the same optimizer step)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from tiny import arena_frame, build_tokenizer

from lmsys.config import InputFormat, PaddingSide, SwapMode, Template
from lmsys.data.batching import Batching, Example
from lmsys.data.dataset import EncodedSplit, encode_split
from lmsys.data.formatting import PairEncoder
from lmsys.data.io import pairs_from_frame
from lmsys.data.schema import Pair, swap_abt, swap_pair
from lmsys.data.templates import CHAT_MARKERS
from lmsys.evaluation.predict_loop import SplitPredictions
from lmsys.modeling.losses import LossWeights
from lmsys.training.plan import epoch_plan
from lmsys.training.settings import LoopSettings

PACKED = Batching(packed=True, max_tokens=64, row_tokens=32, batch_size=4, pad_id=0, padding_side=PaddingSide.left)
PADDED = Batching(packed=False, max_tokens=0, row_tokens=0, batch_size=3, pad_id=0, padding_side=PaddingSide.left)


def plan_settings(swap: SwapMode, batching: Batching) -> LoopSettings:
    """8 pairs per update, seed 3, length-grouped order."""
    return LoopSettings(total_updates=0, pairs_per_update=8, swap=swap, group_by_length=True, batching=batching,
                        max_grad_norm=1.0, eval_frequency=0, patience=None, log_frequency=10, state_frequency=0,
                        loss=LossWeights(), seed=3)


def test_swap_abt_exchanges_a_and_b_keeps_tie_and_is_an_involution():
    values = np.array([[0.5, 0.3, 0.2], [1.0, 2.0, 3.0]])
    assert swap_abt(values).tolist() == [[0.3, 0.5, 0.2], [2.0, 1.0, 3.0]]
    assert swap_abt(np.array([0.7, 0.1, 0.2])).tolist() == [0.1, 0.7, 0.2]
    assert np.array_equal(swap_abt(swap_abt(values)), values)


def test_swap_pair_moves_the_target_with_the_responses():
    pair = Pair("7", ("p1", "p2"), ("a1", "a2"), ("b1", ""), target=(1.0, 0.0, 0.0), meta={"source": "x"})
    swapped = swap_pair(pair)
    assert (swapped.responses_a, swapped.responses_b) == (pair.responses_b, pair.responses_a)
    assert swapped.target == (0.0, 1.0, 0.0) and swapped.label == 1
    assert (swapped.id, swapped.prompts, swapped.meta) == (pair.id, pair.prompts, pair.meta)
    assert swap_pair(swapped) == pair
    assert swap_pair(Pair("8", ("p",), ("a",), ("b",))).target is None
    tie = Pair("9", ("p",), ("a",), ("b",), target=(0.2, 0.3, 0.5))
    assert swap_pair(tie).target == (0.3, 0.2, 0.5)


@pytest.mark.parametrize("input_format", [InputFormat.pab, InputFormat.papb])
def test_encoded_swapped_orientation_is_the_swapped_pair_encoded(input_format):
    """What TTA and swap training rely on: the (B, A) example of a pair is exactly the (A, B) example of the
    swapped pair, truncation included, with the swapped target."""
    encoder = PairEncoder(build_tokenizer(add_bos=False), CHAT_MARKERS[Template.chatml], input_format, 160, 0.2, 1, 1,
                          0.5)
    pairs = pairs_from_frame(arena_frame(20, seed=2), "frame", require_labels=True)
    split = encode_split(pairs, [encoder])
    mirrored = encode_split([swap_pair(pair) for pair in pairs], [encoder])
    assert any(len(ex.ids) == 160 for ex in split.forward)  # some pairs are truncated
    for index, pair in enumerate(pairs):
        swapped, forward = split.swapped[index], mirrored.forward[index]
        assert (swapped.pair_index, swapped.swapped) == (index, True)
        assert np.array_equal(swapped.ids, forward.ids)
        assert np.array_equal(mirrored.swapped[index].ids, split.forward[index].ids)
        assert swapped.target == swap_pair(pair).target == tuple(swap_abt(np.array(split.forward[index].target)))


def test_swapped_predictions_are_mapped_back_to_a_b_tie():
    logits_ab = np.array([[2.0, 0.0, -1.0], [0.1, 0.5, 0.3]])
    # An order-blind model: its (B, A) pass scores the first shown response (B) as the (A, B) pass scored B.
    order_blind = SplitPredictions([logits_ab], [swap_abt(logits_ab)])
    assert np.allclose(order_blind.probs_ba_back, order_blind.probs_ab)
    assert np.allclose(order_blind.combined("prob"), order_blind.probs_ab)
    # A model that always prefers the first shown response: TTA cancels the bias between A and B.
    first_wins = SplitPredictions([np.array([[3.0, 0.0, 0.0]])], [np.array([[3.0, 0.0, 0.0]])])
    combined = first_wins.combined("prob")
    assert combined[0, 0] == pytest.approx(combined[0, 1])


def toy_split(n_pairs: int, seed: int = 0, n_formats: int = 1) -> EncodedSplit:
    """Random ids per pair; format k appends k marker tokens so that the formats' examples differ."""
    rng = np.random.default_rng(seed)
    pairs = []
    forward: list[list[Example]] = [[] for _ in range(n_formats)]
    swapped: list[list[Example]] = [[] for _ in range(n_formats)]
    for index in range(n_pairs):
        target = tuple(float(v) for v in np.eye(3)[index % 3])
        pair = Pair(str(index), ("p",), ("a",), ("b",), target=target)
        ids = rng.integers(5, 100, size=int(rng.integers(8, 40))).astype(np.int32)
        pairs.append(pair)
        for k in range(n_formats):
            marked = np.concatenate([ids, np.full(k, 1, dtype=np.int32)])
            forward[k].append(Example(index, marked, False, pair.target, format_index=k))
            swapped[k].append(Example(index, marked[::-1].copy(), True, swap_pair(pair).target, format_index=k))
    return EncodedSplit(pairs, forward, swapped, [1] * n_pairs)


def plan_examples(split: EncodedSplit, swap: SwapMode, batching: Batching, world_size: int, epoch: int = 0):
    """Per update: every rank's examples, and the update's example count."""
    plans = [epoch_plan(split, epoch, plan_settings(swap, batching), rank, world_size) for rank in range(world_size)]
    for updates in zip(*plans, strict=True):
        yield [[ex for micro in update.micro_batches for ex in micro] for update in updates], updates[0].n_examples


@pytest.mark.parametrize("batching", [PACKED, PADDED])
@pytest.mark.parametrize("world_size", [1, 2])
def test_full_swap_puts_both_orientations_in_one_optimizer_step(batching, world_size):
    split = toy_split(37)
    seen = Counter()
    for per_rank, n_examples in plan_examples(split, SwapMode.full, batching, world_size):
        assert n_examples == sum(len(examples) for examples in per_rank)
        for examples in per_rank:
            forward = Counter(ex.pair_index for ex in examples if not ex.swapped)
            backward = Counter(ex.pair_index for ex in examples if ex.swapped)
            assert forward == backward  # the same pairs, in both orientations, on the same rank in the same update
            for ex in examples:
                assert ex is split.example(ex.pair_index, ex.swapped)  # the swapped target comes with it
        if world_size == 1:
            seen.update((ex.pair_index, ex.swapped) for ex in per_rank[0])
    if world_size == 1:
        assert seen == Counter({(i, s): 1 for i in range(37) for s in (False, True)})  # each once per epoch


@pytest.mark.parametrize("world_size", [1, 2])
def test_full_swap_with_two_formats_puts_four_examples_of_each_pair_in_one_step(world_size):
    """Format augmentation composes with full swap: each pair's (format, orientation) examples, all four, in the
    same update on the same rank, each once per epoch, weighted 1 / (examples in the update) like every other."""
    split = toy_split(37, n_formats=2)
    seen = Counter()
    for per_rank, n_examples in plan_examples(split, SwapMode.full, PADDED, world_size):
        assert n_examples == sum(len(examples) for examples in per_rank)
        for examples in per_rank:
            views = Counter(ex.pair_index for ex in examples)
            assert set(views.values()) == {4}
            kinds = {i: {(ex.format_index, ex.swapped) for ex in examples if ex.pair_index == i} for i in views}
            assert all(kind == {(0, False), (0, True), (1, False), (1, True)} for kind in kinds.values())
            for ex in examples:
                assert ex is split.example(ex.pair_index, ex.swapped, ex.format_index)
            seen.update((ex.pair_index, ex.swapped, ex.format_index) for ex in examples)
    if world_size == 1:
        assert seen == Counter({(i, s, k): 1 for i in range(37) for s in (False, True) for k in (0, 1)})


def test_random_swap_with_two_formats_flips_both_formats_alike():
    split = toy_split(50, n_formats=2)
    examples = [ex for per_rank, _ in plan_examples(split, SwapMode.random, PACKED, 1) for ex in per_rank[0]]
    assert Counter(ex.pair_index for ex in examples) == Counter({i: 2 for i in range(50)})
    by_pair = {}
    for ex in examples:
        by_pair.setdefault(ex.pair_index, set()).add(ex.swapped)
    assert all(len(flips) == 1 for flips in by_pair.values())  # both formats in the same drawn orientation
    assert 0 < sum(flips == {True} for flips in by_pair.values()) < 50


def test_random_swap_uses_each_pair_once_in_a_random_orientation():
    split = toy_split(200)
    orientations = []
    for epoch in (0, 1):
        examples = [ex for per_rank, _ in plan_examples(split, SwapMode.random, PACKED, 1, epoch) for ex in per_rank[0]]
        assert sorted(ex.pair_index for ex in examples) == list(range(200))
        orientations.append({ex.pair_index: ex.swapped for ex in examples})
        assert 0.35 < np.mean(list(orientations[-1].values())) < 0.65
    assert orientations[0] != orientations[1]  # redrawn every epoch


def test_no_swap_trains_the_given_orientation_only():
    split = toy_split(20)
    examples = [ex for per_rank, _ in plan_examples(split, SwapMode.none, PADDED, 1) for ex in per_rank[0]]
    assert not any(ex.swapped for ex in examples) and sorted(ex.pair_index for ex in examples) == list(range(20))
