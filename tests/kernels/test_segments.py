"""build_segments: runs in token order, long runs, the gather form's grouping, and the flags kernels read."""

from __future__ import annotations

import pytest
import torch

from switchboard.kernels.segments import NO_SLOT, build_segments


def test_runs_are_maximal_and_in_token_order() -> None:
    seg = build_segments([2, 2, -1, 0, 0, 0, 2, -1, -1], min_gemm_run=3)
    assert seg.token_slots.tolist() == [2, 2, -1, 0, 0, 0, 2, -1, -1]
    assert seg.starts.tolist() == [0, 2, 3, 6, 7, 9]
    assert seg.slots.tolist() == [2, -1, 0, 2, -1]
    assert seg.max_segment_len == 3
    assert not seg.all_single
    assert seg.num_tokens == 9 and seg.num_adapted == 6 and seg.has_unadapted
    assert seg.long_runs == ((3, 6, 0),)  # the only run of >= 3 tokens with a slot
    assert seg.gather.rows.tolist() == [0, 1, 6] and seg.gather.slots.tolist() == [2, 2, 2]
    assert not seg.gather.covers_all


def test_gather_form_groups_tokens_by_slot_into_a_padded_layout() -> None:
    seg = build_segments([3, -1, 1, 3, 1, 0, 3])
    g = seg.gather
    assert seg.long_runs == ()
    assert g.rows.tolist() == [0, 2, 3, 4, 5, 6]
    assert g.distinct.tolist() == [0, 1, 3] and g.width == 3 and not g.all_slots
    # slot 0 -> group 0, slot 1 -> group 1, slot 3 -> group 2; rank within group in token order
    assert g.padded_pos.tolist() == [2 * 3 + 0, 1 * 3 + 0, 2 * 3 + 1, 1 * 3 + 1, 0 * 3 + 0, 2 * 3 + 2]
    assert g.bag_indices(2).tolist() == [6, 7, 2, 3, 6, 7, 2, 3, 0, 1, 6, 7]
    assert g.bag_indices(2) is g.bag_indices(2)  # built once per step
    assert not g.in_order
    rows = torch.arange(6.0)[:, None]  # token k's row holds k
    assert g.padded(rows).squeeze(-1).tolist() == [[4, 0, 0], [1, 3, 0], [0, 2, 5]]  # zero-padded groups
    assert torch.equal(g.unpadded(g.padded(rows)), rows)


@pytest.mark.parametrize(("slots", "in_order"), [([2] * 5, True), ([0, 0, 1, 1], True), ([0, 1, 0, 1], False)])
def test_rows_already_in_padded_order_are_not_copied(slots: list[int], in_order: bool) -> None:
    g = build_segments(slots).gather
    assert g.in_order == in_order
    rows = torch.randn(len(slots), 3)
    if in_order:
        assert g.padded(rows).data_ptr() == rows.data_ptr()
    torch.testing.assert_close(g.unpadded(g.padded(rows)), rows)


@pytest.mark.parametrize(
    ("slots", "all_single", "max_len"),
    [([], True, 0), ([5], True, 1), ([-1, -1], False, 2), ([0, 1, 0, 1], True, 1), ([0, 0, 1], False, 2)],
)
def test_edge_batches(slots: list[int], all_single: bool, max_len: int) -> None:
    seg = build_segments(slots)
    assert seg.all_single == all_single
    assert seg.max_segment_len == max_len
    assert seg.starts.tolist()[0] == 0 and seg.starts.tolist()[-1] == len(slots)
    assert seg.slots.numel() == seg.starts.numel() - 1
    assert seg.gather.num_tokens == sum(s != NO_SLOT for s in slots) == seg.num_adapted


def test_accepts_a_tensor_and_places_tensors_on_the_device() -> None:
    seg = build_segments(torch.tensor([1, 1, 0], dtype=torch.int32), device="cpu")
    assert seg.token_slots.dtype == torch.int64 and seg.starts.dtype == torch.int64
    assert seg.to("cpu").long_runs == seg.long_runs
    assert seg.gather.all_slots and seg.gather.covers_all


def test_rejects_slots_below_no_slot() -> None:
    with pytest.raises(ValueError, match="slot ids"):
        build_segments([0, -2])


@pytest.mark.parametrize("min_gemm_run", [1, 4, 1000])
def test_every_adapted_token_is_in_exactly_one_form(min_gemm_run: int, make_slots) -> None:
    for seed in range(4):
        slots = make_slots("zipf", 50, 4, seed=seed) + [-1] * 3 + [2] * 9 + make_slots("uniform", 20, 8, seed=seed)
        seg = build_segments(slots, min_gemm_run=min_gemm_run)
        rebuilt = [s for g, s in enumerate(seg.slots.tolist()) for _ in range(seg.starts[g], seg.starts[g + 1])]
        assert rebuilt == slots
        assert all(a != b for a, b in zip(seg.slots.tolist(), seg.slots.tolist()[1:], strict=False))
        covered = [t for start, end, _ in seg.long_runs for t in range(start, end)] + seg.gather.rows.tolist()
        assert sorted(covered) == [t for t, s in enumerate(slots) if s != NO_SLOT]
        assert all(end - start >= min_gemm_run for start, end, _ in seg.long_runs)
        g = seg.gather
        assert sorted(g.padded_pos.tolist()) == sorted(set(g.padded_pos.tolist()))  # one row each
        assert [g.distinct.tolist()[p // g.width] for p in g.padded_pos.tolist()] == g.slots.tolist()
