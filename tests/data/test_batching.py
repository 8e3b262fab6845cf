"""Packing arithmetic: rows never exceed their budget, every example lands exactly once, and the chosen layout
computes fewer tokens than the obvious alternatives."""

import numpy as np
import pytest
import tiny
import torch

from lmsys.config import PaddingSide
from lmsys.data.batching import Batching, Example, collate, fill_by_count, fill_packed, pack_rows, swap_tree


def computed(lengths: list[int], rows: list[list[int]]) -> int:
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def test_short_examples_share_rows_first_fit_decreasing():
    lengths = [300, 200, 100, 250, 150]
    assert pack_rows(lengths, 512) == [[0, 1], [3, 4, 2]]  # 500 and 500 tokens: no padding at all


def test_long_examples_get_rows_as_narrow_as_the_longest():
    lengths = [300, 310, 290, 305]  # none pairs up within 512: one a row, 310 wide instead of 512
    rows = pack_rows(lengths, 512)
    assert sorted(map(sorted, rows)) == [[0], [1], [2], [3]]
    assert computed(lengths, rows) == 4 * 310


def test_an_example_longer_than_a_row_gets_a_row_of_its_own():
    rows = pack_rows([700, 100, 50], 512)
    assert rows[0] == [0] and sorted(i for row in rows for i in row) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(5))
def test_rows_respect_the_budget_and_hold_every_example_once(seed):
    lengths = list(np.random.default_rng(seed).integers(20, 512, size=40))
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(40))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    naive = computed(lengths, [[i] for i in range(40)])
    assert computed(lengths, rows) < 0.75 * naive


def test_fill_packed_keeps_whole_rows_within_the_token_budget():
    lengths = [500, 12, 400, 100, 300, 200, 250, 250, 90, 10]
    groups = fill_packed(lengths, max_tokens=1024, row_tokens=512)
    assert sorted(i for group in groups for i in group) == list(range(10))
    examples = [Example(i, np.arange(n, dtype=np.int32), False, None) for i, n in enumerate(lengths)]
    for group in groups:
        batch = collate([examples[i] for i in group], tiny.batching(True, 0, PaddingSide.left, 512))
        assert batch.input_ids.numel() <= 1024
    total = sum(collate([examples[i] for i in g], tiny.batching(True, 0, PaddingSide.left, 512)).input_ids.numel() for g in groups)
    # rows 500 wide (not 512) pack these exactly: 500 | 400+100 | 300+200 | 250+250 | 90+12+10, no padding at all
    assert total == sum(lengths) and len(groups) == 3


def test_fill_by_count():
    assert fill_by_count(5, 2) == [[0, 1], [2, 3], [4]]


def test_attention_cost_keeps_similar_lengths_in_rows_of_their_own():
    lengths = [250, 248, 245, 240]
    # tokens only (flash varlen): two rows of ~495 compute fewer tokens than four rows 250 wide
    assert len(pack_rows(lengths, 512)) == 2
    # sdpa at SmolLM2's attention width (3072): 2 x 498 x (1 + 498/3072) > 4 x 250 x (1 + 250/3072)
    assert len(pack_rows(lengths, 512, attention_width=3072.0)) == 4
    # mixed lengths still share rows: 400 + 100 in one row beats 400 and 100 in rows 400 wide
    assert pack_rows([400, 100], 512, attention_width=3072.0) == [[0, 1]]


def test_attention_width_of_a_model_config(tmp_path):
    import json
    from dataclasses import replace

    from lmsys.config import Attention
    from lmsys.modeling.model_facts import read_model_facts

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64}))  # SmolLM2-135M
    projections = 576 * 64 * (2 * 9 + 2 * 3) + 3 * 576 * 1536
    spec = replace(tiny.spec_stub(), facts=read_model_facts(tmp_path), attn_implementation=Attention.sdpa)
    assert spec.attention_width == pytest.approx(2 * projections / (4 * 9 * 64)) == 3072.0
    assert replace(spec, attn_implementation=Attention.flash_attention_2).attention_width is None


# --- swap trees: a pair's two orientations sharing their common prefix -------------------------------------------

def oriented(pair_index: int, ids: list[int], swapped: bool) -> Example:
    return Example(pair_index, np.asarray(ids, dtype=np.int32), swapped, None)


def test_a_swap_tree_holds_the_common_prefix_once_and_the_rests_in_canonical_order():
    forward, swapped = oriented(3, [1, 2, 3, 9, 8, 7], False), oriented(3, [1, 2, 3, 5, 6], True)
    tree = swap_tree(forward, swapped)
    assert tree.ids.tolist() == [1, 2, 3, 5, 6, 9, 8, 7]  # the smaller rest, (5, 6), first: the (B, A) one
    assert (tree.pair_index, tree.swapped, tree.second_start, tree.shared_prefix) == (3, True, 5, 3)
    assert [s.tolist() for s in tree.sequences()] == [[1, 2, 3, 5, 6], [9, 8, 7]]
    exchanged = swap_tree(oriented(3, [1, 2, 3, 5, 6], False), oriented(3, [1, 2, 3, 9, 8, 7], True))
    assert exchanged.ids.tolist() == tree.ids.tolist() and not exchanged.swapped  # the same tree, to the token


def test_a_swap_tree_keeps_each_orientations_last_token():
    same = swap_tree(oriented(0, [4, 5, 6], False), oriented(0, [4, 5, 6], True))  # A == B
    assert same.ids.tolist() == [4, 5, 6, 6] and same.shared_prefix == 2
    apart = swap_tree(oriented(1, [7, 1], False), oriented(1, [8, 1], True))  # nothing shared
    assert apart.ids.tolist() == [7, 1, 8, 1] and apart.shared_prefix == 0


def test_swap_trees_collate_with_positions_going_on_from_the_prefix():
    trees = [swap_tree(oriented(0, [1, 2, 3, 9, 8], False), oriented(0, [1, 2, 3, 5], True)),
             swap_tree(oriented(1, [4, 6], False), oriented(1, [4, 7, 7], True))]
    batching = Batching(True, 64, 16, 8, 0, PaddingSide.left)
    batch = collate(trees, batching)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 9, 8, 4, 6, 7, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3, 4, 0, 1, 1, 2]]
    assert batch.pool_cols.tolist() == [3, 5, 7, 9]  # each tree's two sequences' last tokens
    assert batch.shared_prefixes.tolist() == [[4, 0, 3], [8, 6, 1]]  # (first token, prefix start, prefix length)
    assert batch.model_inputs(torch.device("cpu"))["shared_prefixes"] is batch.shared_prefixes
    with pytest.raises(ValueError, match="need packed micro-batches"):
        collate(trees, Batching(False, 64, 16, 8, 0, PaddingSide.left))
    assert "shared_prefixes" not in collate([oriented(0, [1, 2], False)], batching).model_inputs(torch.device("cpu"))
