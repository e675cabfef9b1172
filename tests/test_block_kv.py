"""The block KV layout's pure parts: settings (block_kv.resolve), the runner's inputs
(inputs.with_blocks, inputs.chunked_inputs) and the contract's checks of them
(protocol.check_blocks), without a model."""

from __future__ import annotations

import pytest
import torch

from vllm_neuronx import block_kv
from vllm_neuronx.backends.protocol import check_blocks
from vllm_neuronx.worker.inputs import (
    SequenceRow,
    chunked_inputs,
    decode_inputs,
    prefill_inputs,
    with_blocks,
)

LAYOUT = block_kv.BlockLayout(block_size=4, num_blocks=20, prefix_caching=True,
                              chunked_prefill=False)
SEQ_LEN = 16


def resolve(overrides=None, **kw):
    args = dict(prefix_caching=None, chunked_prefill=None, block_size=None, num_blocks=None,
                max_num_seqs=4, seq_len=256)
    return block_kv.resolve(overrides or {}, **{**args, **kw})


def test_nothing_asked_is_the_contiguous_layout():
    assert resolve() is None
    assert resolve(prefix_caching=False, chunked_prefill=False) is None


def test_defaults_let_every_sequence_reach_max_model_len():
    layout = resolve(prefix_caching=True)
    assert layout == block_kv.BlockLayout(32, 4 * 256 // 32 + 1, True, False)
    keys = block_kv.neuron_config_keys(layout, 4)
    assert keys == {"is_block_kv_layout": True, "is_prefix_caching": True,
                    "pa_block_size": 32, "pa_num_blocks": 33}
    assert block_kv.of(keys) == layout
    chunked = resolve(chunked_prefill=True)
    assert (chunked.prefix_caching, chunked.chunked_prefill) == (False, True)
    assert block_kv.of(block_kv.neuron_config_keys(chunked, 4)) == chunked


def test_the_nxdi_keys_select_and_size_it_as_vllm_settings_do():
    keyed = resolve({"is_prefix_caching": True, "pa_block_size": 16, "pa_num_blocks": 40})
    assert keyed == block_kv.BlockLayout(16, 40, True, False)
    assert keyed == resolve(prefix_caching=True, block_size=16, num_blocks=40)
    # The same number twice is fine; only a contradiction is refused.
    assert resolve({"pa_num_blocks": 40}, prefix_caching=True, num_blocks=40).num_blocks == 40


@pytest.mark.parametrize(("overrides", "kw", "match"), [
    ({}, {"prefix_caching": True, "block_size": 48}, "block_size 48 does not divide"),
    ({"pa_block_size": 0}, {"prefix_caching": True}, "pa_block_size must be a positive"),
    ({"pa_block_size": 16}, {"prefix_caching": True, "block_size": 32},
     "pa_block_size=16 contradicts block_size=32"),
    ({}, {"prefix_caching": True, "num_blocks": 8}, "give at least 9"),
    ({"is_prefix_caching": False}, {"prefix_caching": True},
     "is_prefix_caching=False contradicts enable_prefix_caching=True"),
    ({"chunked_prefill_config": {"max_num_seqs": 4}}, {"chunked_prefill": False},
     "enable_chunked_prefill is off"),
    ({"is_block_kv_layout": False}, {"prefix_caching": True}, "is_block_kv_layout=false"),
    ({"pa_num_blocks": 40}, {}, "'pa_num_blocks' sizes the block KV layout, which is off"),
])
def test_bad_settings_name_themselves(overrides, kw, match):
    with pytest.raises(block_kv.BlockLayoutError, match=match):
        resolve(overrides, **kw)


def row(req_id, line, tokens, blocks, computed=0):
    return SequenceRow(req_id, line, list(tokens), (1, 1.0, 1.0), blocks=blocks,
                       computed=computed)


def test_prefill_inputs_pass_whole_sequences_with_the_slots_past_the_cached_prefix():
    rows = [row("a", 0, range(10, 20), [5, 2, 9], computed=8), row("b", 1, range(3), [7])]
    step = with_blocks(prefill_inputs(rows), rows, LAYOUT, SEQ_LEN)
    b = step.blocks
    assert step.input_ids[0].tolist() == list(range(10, 20))  # the whole sequence
    assert b.full_context_lens.tolist() == [10, 3]
    assert b.computed_context_lens.tolist() == [8, 0]
    # a: positions 8 and 9 in its third block (9): slots 36, 37; b: 28, 29, 30 (block 7).
    assert b.slot_mapping.tolist() == [[36, 37, -1], [28, 29, 30]]
    assert b.block_table.tolist() == [[5, 2, 9, 0], [7, 0, 0, 0]]
    check_blocks(b, LAYOUT, step.position_ids, True, SEQ_LEN)


def test_decode_inputs_follow_the_sorted_rows():
    rows = [row("late", 3, range(6), [4, 8]), row("early", 1, range(5), [6, 3])]
    step = with_blocks(decode_inputs(rows), [rows[1], rows[0]], LAYOUT, SEQ_LEN)
    b = step.blocks
    assert step.req_ids == ["early", "late"]
    assert b.slot_mapping.tolist() == [[3 * 4 + 0], [8 * 4 + 1]]  # positions 4 and 5
    assert b.full_context_lens.tolist() == [5, 6]
    assert b.computed_context_lens.tolist() == [4, 5]
    check_blocks(b, LAYOUT, step.position_ids, False, SEQ_LEN)


def test_chunked_inputs_flatten_chunks_and_decodes():
    rows = [row("p", 0, range(10), [1, 2, 3]), row("d", 1, range(30, 36), [4, 5])]
    step = chunked_inputs(rows, counts=[4, 1], computed=[4, 5], layout=LAYOUT, seq_len=SEQ_LEN)
    assert step.input_ids.tolist() == [[4, 5, 6, 7, 35]]
    assert step.position_ids.tolist() == [[4, 5, 6, 7, 5]]
    assert step.blocks.slot_mapping.tolist() == [[8, 9, 10, 11, 21]]
    assert step.sampled == [False, True]  # "p" is mid-prompt
    assert step.blocks.full_context_lens.tolist() == [8, 6]


@pytest.mark.parametrize(("change", "match"), [
    (lambda b: b.block_table.__setitem__((0, 0), 20), r"block ids in \[0, 20\)"),
    (lambda b: b.block_table.__setitem__((1, 0), 0), "not the null block"),
    (lambda b: b.slot_mapping.__setitem__((0, 0), 37), "slots of positions 8..9"),
    (lambda b: b.slot_mapping.__setitem__((0, 2), 5), "through its block_table, then -1"),
    (lambda b: b.computed_context_lens.__setitem__(0, 6), "whole blocks of 4"),
    (lambda b: b.full_context_lens.__setitem__(1, 4), "each prefill row's length"),
])
def test_the_contract_names_a_wrong_block_input(change, match):
    rows = [row("a", 0, range(10, 20), [5, 2, 9], computed=8), row("b", 1, range(3), [7])]
    step = with_blocks(prefill_inputs(rows), rows, LAYOUT, SEQ_LEN)
    change(step.blocks)
    with pytest.raises(ValueError, match=match):
        check_blocks(step.blocks, LAYOUT, step.position_ids, True, SEQ_LEN)


def test_slots_of_positions_through_a_block_table():
    assert block_kv.slots([3, 1], 2, 6, 4) == [14, 15, 4, 5]
    assert torch.equal(torch.tensor(block_kv.slots([2], 0, 1, 4)), torch.tensor([8]))
