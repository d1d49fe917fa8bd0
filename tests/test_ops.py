import pytest
import torch

from mltrain import ops

from conftest import CI


def test_extension_built_in_ci():
    if CI:
        assert ops.has_ext, ops.ext_status()
    elif not ops.has_ext:
        pytest.skip(ops.ext_status())


def _tensors(dtype, sizes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(dtype) for s in sizes]


SIZES = [(3, 4), (1,), (70000,), (5, 1, 7), (0,), (40000, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3])
def test_pack_unpack_match_reference_bitwise(dtype, scale):
    if not ops.has_ext:
        pytest.skip(ops.ext_status())
    ts = _tensors(dtype, SIZES)
    n = sum(t.numel() for t in ts)
    ext, ref = torch.full((n + 5,), 7.0, dtype=dtype), torch.full((n + 5,), 7.0, dtype=dtype)
    assert ops._C.pack(ts, ext, scale) == n
    assert ops.pack_reference(ts, ref, scale) == n
    assert torch.equal(ext, ref)  # the tail beyond n untouched in both
    outs_e = [torch.empty_like(t) for t in ts]
    outs_r = [torch.empty_like(t) for t in ts]
    ops._C.unpack(ext, outs_e, scale)
    ops.unpack_reference(ref, outs_r, scale)
    for a, b in zip(outs_e, outs_r):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_tensors(dtype):
    ts = [torch.arange(n).to(dtype) for n in (5, 0, 70000)]
    flat = torch.zeros(70005, dtype=dtype)
    ops.pack(ts, flat)
    assert torch.equal(flat, torch.cat(ts))
    outs = [torch.zeros_like(t) for t in ts]
    ops.unpack(flat, outs)
    assert all(torch.equal(a, b) for a, b in zip(ts, outs))
    if ops.has_ext:
        with pytest.raises(RuntimeError, match="floating-point"):
            ops._C.pack(ts, flat, 0.5)


def test_round_trip_and_dispatch():
    ts = _tensors(torch.float64, SIZES)
    flat = torch.empty(sum(t.numel() for t in ts), dtype=torch.float64)
    ops.pack(ts, flat)
    outs = [torch.zeros_like(t) for t in ts]
    ops.unpack(flat, outs)
    assert all(torch.equal(a, b) for a, b in zip(ts, outs))


def test_errors_are_clear():
    if not ops.has_ext:
        pytest.skip(ops.ext_status())
    with pytest.raises(RuntimeError, match="only"):
        ops._C.pack([torch.ones(5)], torch.empty(4), 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        ops._C.pack([torch.ones(2, dtype=torch.float64)], torch.empty(4), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops._C.pack([torch.ones(4, 4).t()], torch.empty(16), 1.0)
