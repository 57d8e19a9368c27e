"""LoRA on a packed linear (`lora_packed`): one shrink for every part, then each part's expand into its columns.

The compiled CPU op (kernels/cpu_adapters.py) and the torch fallback against the float32 reference, over popularity
patterns, dtypes, ranks (including ones that are not a multiple of the vector width), and parts of odd widths."""

from __future__ import annotations

import pytest
import torch

from switchboard.kernels import cpu_adapters, sgmv
from switchboard.kernels.backend import Backend, get_kernels
from switchboard.kernels.segments import build_segments

# (rank, in, part widths, slots, tokens): q|k|v with GQA widths, gate|up, a lone part, odd sizes for the tails
SHAPES = [(16, 512, (512, 128, 128), 32, 40), (8, 64, (176, 176), 4, 24), (1, 96, (40,), 2, 9), (5, 33, (7, 19), 3, 17)]
SHAPE_IDS = [f"r{r}-in{i}-parts{'+'.join(map(str, p))}-S{s}" for r, i, p, s, _ in SHAPES]
needs_compiled = pytest.mark.skipif(
    not cpu_adapters.compiled_adapters_available(),
    reason=f"no C++ build here: {cpu_adapters.compiled_adapters_unavailable_reason()}",
)


def _case(shape, pattern, dtype, make_slots, make_randn):
    r, d_in, widths, S, T = shape
    slots = make_slots(pattern, T, S)
    T = len(slots)
    x = make_randn(T, d_in, dtype=dtype, seed=1)
    A = sgmv.to_k_major(make_randn(S, len(widths) * r, d_in, dtype=dtype, scale=d_in**-0.5, seed=2))
    parts, col = [], 0
    for p, w in enumerate(widths):
        B = sgmv.to_k_major(make_randn(S, w, r, dtype=dtype, scale=r**-0.5, seed=3 + p))
        parts.append((B, col, p * r))
        col += w
    y = make_randn(T, col, dtype=dtype, seed=9)
    return slots, x, A, parts, y


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_lora_packed_matches_reference(
    shape, pattern, dtype, gather_path, make_slots, make_randn, assert_close
) -> None:
    slots, x, A, parts, y = _case(shape, pattern, dtype, make_slots, make_randn)
    lora = sgmv.pack_lora(A, parts)
    expected = sgmv.lora_packed_ref(y.clone(), x, lora, build_segments(slots))
    row_major = sgmv.pack_lora(A.contiguous(), [(B.contiguous(), c, r) for B, c, r in parts])  # the torch path
    for min_run in (1, 8, 10**9):  # every run a matmul, the default split, every token gathered
        seg = build_segments(slots, min_gemm_run=min_run)
        out = y.clone()
        assert gather_path.lora_packed(out, x, lora, seg) is out
        assert_close(out, expected, f"min_gemm_run={min_run}")
        assert_close(gather_path.lora_packed(y.clone(), x, row_major, seg), expected, "row-major")


def test_pack_lora_derives_the_compiled_operands_once(make_randn) -> None:
    _, _, A, parts, _ = _case(SHAPES[0], "uniform", torch.float32, lambda p, T, S: [0], make_randn)
    lora = sgmv.pack_lora(A, parts)
    if not cpu_adapters.compiled_adapters_available():
        assert lora.compiled is None
        return
    c = lora.compiled
    A_storage, Bs, cols, rows, r, coded = c.a_storage, c.b_storages, c.cols, c.rows, c.rank, c.coded
    assert A_storage.is_contiguous() and A_storage.data_ptr() == A.data_ptr()  # the slots themselves, no copy
    assert [B.data_ptr() for B in Bs] == [B.data_ptr() for B, _, _ in parts]
    assert (cols, rows, r) == ([0, 512, 640], [0, 16, 32], 16)
    assert coded == []  # float32 stacks are not coded
    row_major = sgmv.pack_lora(A.contiguous(), [(B.contiguous(), c, r) for B, c, r in parts])
    assert row_major.compiled is None  # not k-major: the torch path
    # Where the op cannot run on the activations (a transposed x) the torch path takes the call.
    assert not cpu_adapters.rows_apply(torch.zeros(4, 512).t())


@needs_compiled
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_compiled_op_matches_reference(shape, pattern, dtype, make_slots, make_randn, assert_close) -> None:
    slots, x, A, parts, y = _case(shape, pattern, dtype, make_slots, make_randn)
    expected = sgmv.lora_packed_ref(y.clone(), x, sgmv.pack_lora(A, parts), build_segments(slots))
    storage = [(B.transpose(1, 2), c, r) for B, c, r in parts]
    out = cpu_adapters.lora_packed_gather(
        y.clone(), x, torch.as_tensor(slots, dtype=torch.int64), A.transpose(1, 2), storage, shape[0]
    )
    assert_close(out, expected)


@needs_compiled
def test_compiled_op_writes_only_its_tokens_and_columns(make_randn) -> None:
    x, A = make_randn(5, 32, dtype=torch.float32), sgmv.to_k_major(make_randn(2, 4, 32, dtype=torch.float32))
    B = sgmv.to_k_major(make_randn(2, 8, 4, dtype=torch.float32))
    wide = make_randn(5, 20, dtype=torch.float32, seed=3)
    y = wide[:, 6:]  # a column slice with a row stride: the part lands at column 2 of the slice
    before = wide.clone()
    slots = torch.tensor([-1, 1, -1, 0, 1])
    cpu_adapters.lora_packed_gather(y, x, slots, A.transpose(1, 2), [(B.transpose(1, 2), 2, 0)], 4)
    changed = (wide != before).nonzero()
    assert changed[:, 0].unique().tolist() == [1, 3, 4]
    assert changed[:, 1].unique().tolist() == list(range(8, 16))


@needs_compiled
def test_compiled_op_rejects_bad_inputs(make_randn) -> None:
    x, A = make_randn(3, 16, dtype=torch.float32), make_randn(2, 16, 4, dtype=torch.float32)
    B, y = make_randn(2, 4, 8, dtype=torch.float32), make_randn(3, 8, dtype=torch.float32)
    op = cpu_adapters.lora_packed_gather
    with pytest.raises(RuntimeError, match="out of range"):
        op(y, x, torch.tensor([0, 2, -1]), A, [(B, 0, 0)], 4)
    with pytest.raises(RuntimeError, match="columns out of range"):
        op(y, x, torch.tensor([0, 1, -1]), A, [(B, 1, 0)], 4)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(y.double(), x, torch.tensor([0, 1, -1]), A, [(B, 0, 0)], 4)
    with pytest.raises(RuntimeError, match="int64"):
        op(y, x, torch.tensor([0, 1, -1], dtype=torch.int32), A, [(B, 0, 0)], 4)


def test_every_backend_offers_the_packed_form(make_randn, assert_close) -> None:
    slots, x, A, parts, y = _case(SHAPES[1], "uniform", torch.float32, lambda p, T, S: [0, 1, -1, 3] * 6, make_randn)
    seg, lora = build_segments(slots), sgmv.pack_lora(A, parts)
    expected = sgmv.lora_packed_ref(y.clone(), x, lora, seg)
    backends = [Backend.REFERENCE, Backend.TORCH]
    if cpu_adapters.compiled_adapters_available():
        backends.append(Backend.COMPILED_CPU)
    for backend in backends:
        assert_close(get_kernels(backend).lora_packed(y.clone(), x, lora, seg), expected, backend.value)
