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
    with pytest.raises(RuntimeError, match="conversion only between floating"):
        ops._C.pack([torch.ones(2, dtype=torch.int64)], torch.empty(4), 1.0)
    with pytest.raises(RuntimeError, match="has dtype"):
        ops._C.pack([torch.ones(2), torch.ones(2, dtype=torch.float64)], torch.empty(4), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops._C.pack([torch.ones(4, 4).t()], torch.empty(16), 1.0)


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def need_ext():
    if not ops.has_ext:
        pytest.skip(ops.ext_status())


@pytest.mark.parametrize("src, dst", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.bfloat16),
    (torch.float64, torch.bfloat16),
])
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3])
def test_pack_with_cast_matches_reference(src, dst, scale):
    need_ext()
    ts = _tensors(src, SIZES)
    n = sum(t.numel() for t in ts)
    ext, ref = torch.zeros(n, dtype=dst), torch.zeros(n, dtype=dst)
    ops._C.pack(ts, ext, scale)
    ops.pack_reference(ts, ref, scale)
    assert torch.equal(ext, ref)
    back_e = [torch.empty_like(t) for t in ts]
    back_r = [torch.empty_like(t) for t in ts]
    ops._C.unpack(ext, back_e, scale)
    ops.unpack_reference(ref, back_r, scale)
    assert all(torch.equal(a, b) for a, b in zip(back_e, back_r))


def _layers(n, inner, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *inner, generator=g, dtype=torch.float64).to(dtype)


INNER = [(), (7,), (3, 5), (1, 40000)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("cf", [2, 3, 4])
@pytest.mark.parametrize("inner", INNER, ids=str)
def test_transfer_kernels_match_reference(dtype, cf, inner):
    need_ext()
    for nc in (1, 2, 5):
        fine = _layers(nc * cf, inner, dtype)
        for mode in ops.RESTRICTIONS:
            assert torch.equal(ops._C.restrict_depth(fine, cf, mode),
                               ops.restrict_reference(fine, cf, mode)), (mode, nc)
        coarse = _layers(nc, inner, dtype, seed=1)
        for mode in ops.PROLONGATIONS:
            assert torch.equal(ops._C.prolong_depth(coarse, cf, mode, 0),
                               ops.prolong_reference(coarse, cf, mode)), (mode, nc)


@pytest.mark.parametrize("cf", [2, 3, 4])
def test_transfer_properties(cf):
    coarse = _layers(5, (3,), torch.float64)
    for mode in ops.PROLONGATIONS:  # R o P = I for injection
        assert torch.equal(ops.restrict(ops.prolong(coarse, cf, mode), cf, "injection"), coarse)
    const = torch.full((4 * cf, 3), 2.5, dtype=torch.float64)
    for mode in ops.RESTRICTIONS:  # constants survive restriction ...
        assert torch.allclose(ops.restrict(const, cf, mode), const[:4], rtol=1e-15)
    for mode in ops.PROLONGATIONS:  # ... and prolongation
        assert torch.allclose(ops.prolong(const[:4], cf, mode), const, rtol=1e-15)
    # Weights linear in depth are reproduced by linear prolongation, everywhere.
    depth = torch.arange(5 * cf, dtype=torch.float64)
    w = (0.5 + 0.25 * depth)[:, None] * torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(ops.prolong(w[::cf], cf, "linear"), w, rtol=1e-14, atol=1e-14)
    # Full weighting with cf = 2 is the [1/4, 1/2, 1/4] stencil inside.
    if cf == 2:
        x = _layers(8, (2,), torch.float64)
        r = ops.restrict(x, 2, "full_weighting")
        assert torch.allclose(r[1], 0.25 * x[1] + 0.5 * x[2] + 0.25 * x[3], rtol=1e-15)


@pytest.mark.parametrize("mode", ["injection", "full_weighting"])
def test_restrict_gradcheck(mode):
    x = _layers(6, (2,), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.restrict(t, 3, mode), (x,))


@pytest.mark.parametrize("mode", ["constant", "linear"])
def test_prolong_gradcheck(mode):
    x = _layers(3, (2,), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.prolong(t, 2, mode), (x,))


def test_transfer_errors():
    x = _layers(6, (2,), torch.float32)
    with pytest.raises(ValueError, match="not divisible"):
        ops.restrict(x, 4, "injection")
    with pytest.raises(ValueError, match="mode"):
        ops.restrict(x, 2, "average")
    with pytest.raises(ValueError, match="mode"):
        ops.prolong(x, 2, "cubic")
    with pytest.raises(ValueError, match="coarsening factor"):
        ops.prolong(x, 0, "constant")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 1001, 200003])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_sum_buffers_matches_reference(dtype, n, k):
    need_ext()
    bufs = [_layers(n, (), dtype, seed=s) for s in range(k)]
    ext, ref = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    ops._C.sum_buffers(ext, bufs)
    ops.sum_buffers_reference(ref, bufs)
    assert torch.equal(ext, ref)
    alias = bufs[0].clone()
    ops.sum_buffers(alias, [alias] + bufs[1:])  # in place into the first buffer
    assert torch.equal(alias, ref)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 1001, 200003])
def test_axpby_matches_reference(dtype, n):
    need_ext()
    x, y = _layers(n, (), dtype, 0), _layers(n, (), dtype, 1)
    for a, b in ((0.5, 0.5), (1 / 3, -2.0), (1.0, 0.0)):
        ext, ref = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
        ops._C.axpby(ext, a, x, b, y)
        ops.axpby_reference(ref, a, x, b, y)
        assert torch.equal(ext, ref), (a, b)
    inplace = x.clone()
    ops.axpby(inplace, 0.5, inplace, 0.5, y)
    assert torch.equal(inplace, ops.axpby_reference(torch.empty_like(x), 0.5, x, 0.5, y))


def test_reduce_errors():
    with pytest.raises(ValueError, match="at least one"):
        ops.sum_buffers(torch.empty(3), [])
    if ops.has_ext:
        with pytest.raises(RuntimeError, match="elements"):
            ops._C.sum_buffers(torch.empty(3), [torch.empty(4)])
        with pytest.raises(RuntimeError, match="dtype"):
            ops._C.axpby(torch.empty(3), 1.0, torch.empty(3, dtype=torch.float64), 1.0,
                         torch.empty(3))


def _residual_chain(dtype, n=6, width=5, batch=4):
    from mltrain.nn import ResNet
    torch.manual_seed(3)
    blocks = list(ResNet(width, width, n, 3).to(dtype).blocks)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, width, generator=g, dtype=torch.float64).to(dtype)
    adds = [torch.randn(batch, width, generator=g, dtype=torch.float64).to(dtype)
            for _ in blocks]
    return blocks, x, adds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1, 4])
@pytest.mark.parametrize("with_adds", [False, True])
def test_residual_sweeps_are_the_block_steps_bitwise(dtype, scale, with_adds):
    """The sweeps (C++ when built, and their references) are the blocks' single-step fast
    path applied in turn, bit for bit."""
    blocks, x, adds = _residual_chain(dtype)
    adds = adds if with_adds else None
    cls = type(blocks[0])
    with torch.no_grad():
        want, t = [], x
        for i, b in enumerate(blocks):
            t = b.mgrit_step(t, scale) + (adds[i] if adds else 0)
            want.append(t)
        w = [b.linear.weight for b in blocks]
        bias = [b.linear.bias for b in blocks]
        h = [b.h for b in blocks]
        for got in (cls.mgrit_sweep(blocks, x, scale, adds),
                    ops.residual_sweep_reference(x, w, bias, h, scale, adds)):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        # independent steps from given states
        xs = [x * (i + 1) for i in range(len(blocks))]
        steps = [b.mgrit_step(s, scale) for b, s in zip(blocks, xs)]
        for got in (cls.mgrit_steps(blocks, xs, scale),
                    ops.residual_steps_reference(xs, w, bias, h, scale)):
            assert all(torch.equal(a, b) for a, b in zip(got, steps))
        # adjoint: masks and the chain of products, in the order given (reversed here)
        masks = cls.mgrit_linearize_many(blocks, xs)
        assert all(torch.equal(m, b.mgrit_linearize(s)) for m, b, s in zip(masks, blocks, xs))
        assert all(torch.equal(a, b) for a, b in
                   zip(masks, ops.residual_masks_reference(xs, w, bias)))
        rb, rm = blocks[::-1], masks[::-1]
        want, lam = [], x
        for i, (b, m) in enumerate(zip(rb, rm)):
            lam = b.mgrit_vjp(m, lam, scale) + (adds[i] if adds else 0)
            want.append(lam)
        for got in (cls.mgrit_vjp_sweep(rb, rm, x, scale, adds),
                    ops.residual_vjp_sweep_reference(x, rm, [b.linear.weight for b in rb],
                                                     [b.h for b in rb], scale, adds)):
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_residual_sweep_errors_are_clear():
    need_ext()
    blocks, x, adds = _residual_chain(torch.float64)
    w = [b.linear.weight for b in blocks]
    with pytest.raises(RuntimeError, match="6 weights, 5 biases"):
        ops._C.residual_sweep(x, w, [b.linear.bias for b in blocks][:5], [0.1] * 6, 1, [])
    with pytest.raises(RuntimeError, match="2 additive terms for 6 steps"):
        ops._C.residual_sweep(x, w, [b.linear.bias for b in blocks], [0.1] * 6, 1, adds[:2])
