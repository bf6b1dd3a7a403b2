"""The kbit format on the CPU: codebook, E4M4, bit-planes, quantize/dequantize."""

import math

import pytest
import torch

from vllm_kbit import format as kfmt

BITS = kfmt.SUPPORTED_BITS


@pytest.mark.parametrize("bits", BITS)
def test_codebook_is_normal_float(bits):
    cb = kfmt.normal_float_codebook(bits).double()
    n = 1 << bits
    assert cb.shape == (n,)
    assert torch.all(cb[1:] > cb[:-1]), "sorted ascending"
    assert cb[0] == -1 and cb[-1] == 1
    assert torch.allclose(cb, -cb.flip(0)), "symmetric"
    # Independent check: the conditional means by numerical integration of x * pdf(x) over each bin.
    normal = torch.distributions.Normal(0.0, 1.0)
    edges = normal.icdf(torch.linspace(0, 1, n + 1, dtype=torch.float64).clamp(1e-12, 1 - 1e-12))
    means = []
    for a, b in zip(edges[:-1], edges[1:]):
        x = torch.linspace(a.item(), b.item(), 200001, dtype=torch.float64)
        pdf = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        means.append(torch.trapezoid(x * pdf, x) / torch.trapezoid(pdf, x))
    means = torch.stack(means)
    assert torch.allclose(cb, means / means.abs().max(), atol=2e-4)


def test_e4m4_table_and_round_trip():
    table = kfmt.e4m4_table()
    assert table[0] == 0
    assert table[1] == pytest.approx(kfmt.E4M4_MIN_SUBNORMAL) and table[1] == pytest.approx(6.1035e-5, rel=1e-4)
    assert table[-1] == kfmt.E4M4_MAX == 31.0
    assert torch.all(table[1:] > table[:-1])
    codes = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(kfmt.e4m4_encode(kfmt.e4m4_decode(codes)), codes)


def test_e4m4_relative_error_over_range():
    # Fresh log-uniform values over the whole normal range: round-to-nearest with a 4-bit mantissa
    # errs by at most half a step, 1/32 relative -- inside the 6.25% the format promises.
    values = torch.exp(torch.empty(200_000).uniform_(math.log(kfmt.E4M4_MIN_NORMAL), math.log(31.0)))
    decoded = kfmt.e4m4_decode(kfmt.e4m4_encode(values))
    rel = ((decoded - values).abs() / values).max().item()
    assert rel <= 1 / 32 + 1e-6
    # Subnormals: absolute error at most half the subnormal step.
    small = torch.empty(10_000).uniform_(0, kfmt.E4M4_MIN_NORMAL)
    err = (kfmt.e4m4_decode(kfmt.e4m4_encode(small)) - small).abs().max().item()
    assert err <= kfmt.E4M4_MIN_SUBNORMAL / 2 + 1e-12


def test_e4m4_rejects_out_of_range():
    with pytest.raises(kfmt.KbitFormatError, match="exceeds"):
        kfmt.e4m4_encode(torch.tensor([32.0]))
    with pytest.raises(kfmt.KbitFormatError):
        kfmt.e4m4_encode(torch.tensor([-1.0]))


@pytest.mark.parametrize("bits", BITS)
def test_bitplanes_round_trip(bits):
    idx = torch.randint(0, 1 << bits, (7, 5, 32), dtype=torch.uint8)
    planes = kfmt.pack_bitplanes(idx, bits)
    assert planes.dtype == torch.int32 and planes.shape == (7, 5 * bits)
    # bit j of plane b is bit b of weight j's index
    w = planes.view(7, 5, bits).to(torch.int64) & 0xFFFFFFFF
    for b in range(bits):
        for j in (0, 13, 31):
            assert torch.equal((w[..., b] >> j) & 1, (idx[..., j].to(torch.int64) >> b) & 1)
    assert torch.equal(kfmt.unpack_bitplanes(planes, bits), idx.flatten(-2))


@pytest.mark.parametrize("bits", BITS)
def test_index_round_trip_is_exact(bits):
    w = torch.randn(48, 320)
    q = kfmt.quantize(w, bits)
    assert q.qweight.shape == (48, 10 * bits) and q.absmax.shape == (48, 10) and q.scale.shape == (48,)
    again = kfmt.quantize(kfmt.dequantize(q), bits)
    assert torch.equal(again.qweight, q.qweight)
    assert torch.equal(again.absmax, q.absmax)


def _sqnr_db(w, d):
    return 10 * math.log10(w.double().pow(2).sum().item() / (w.double() - d.double()).pow(2).sum().item())


def _ideal_sqnr_db(w, bits):
    """The codebook's own quality: exact fp32 absmax per block, brute-force nearest entry."""
    cb = kfmt.normal_float_codebook(bits)
    blocks = w.reshape(-1, 32)
    absmax = blocks.abs().amax(-1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - cb).abs().argmin(-1)
    return _sqnr_db(blocks, cb[idx] * absmax)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_sqnr_meets_codebook_bound(bits, dist):
    gen = torch.Generator().manual_seed(bits)
    if dist == "gaussian":
        w = torch.randn(256, 1024, generator=gen)
    else:  # heavy-tailed, as real weights with outliers are
        w = torch.distributions.StudentT(3.0).sample((256, 1024))
    sqnr = _sqnr_db(w, kfmt.dequantize(kfmt.quantize(w, bits)))
    ideal = _ideal_sqnr_db(w, bits)
    # E4M4 moves each block scale by at most 1/32 relative: it may cost a fraction of a dB, never more.
    assert sqnr >= ideal - 0.5, (sqnr, ideal)
    # Each extra bit must buy real quality on Gaussian weights (about 5-6 dB per bit for NF codebooks).
    if dist == "gaussian" and bits > 2:
        lower = _sqnr_db(w, kfmt.dequantize(kfmt.quantize(w, bits - 1)))
        assert sqnr - lower > 4.0


def test_all_zero_blocks_and_rows_stay_zero():
    w = torch.randn(4, 128)
    w[1] = 0  # whole row
    w[2, 32:64] = 0  # one block
    q = kfmt.quantize(w, 4)
    d = kfmt.dequantize(q)
    assert torch.all(d[1] == 0) and torch.all(d[2, 32:64] == 0)
    assert q.absmax[2, 1] == 0
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()


def test_huge_outliers_do_not_saturate():
    w = torch.randn(8, 256) * 0.02
    w[3, 7] = 5e4  # an outlier block far above E4M4's range without the row scale
    w[5, 100] = -1e6
    q = kfmt.quantize(w, 4)
    d = kfmt.dequantize(q)
    # The outlier itself is a codebook endpoint times its block scale: off by the E4M4 error at most.
    assert d[3, 7].item() == pytest.approx(5e4, rel=1 / 32)
    assert d[5, 100].item() == pytest.approx(-1e6, rel=1 / 32)
    # Rows without outliers are untouched by them (per-row scale).
    clean = [0, 1, 2, 4, 6, 7]
    assert _sqnr_db(w[clean], d[clean]) > 18


def test_tiny_blocks_next_to_large_ones_keep_their_scale():
    # A block 1e-4 times the row max still encodes as a normal E4M4 number (range 31 / 2^-10 = 31744).
    w = torch.randn(2, 64)
    w[:, 32:] *= 1e-4
    d = kfmt.dequantize(kfmt.quantize(w, 5))
    assert _sqnr_db(w[:, 32:], d[:, 32:]) > 20


def test_bad_inputs_are_rejected_with_the_fix():
    with pytest.raises(kfmt.KbitFormatError, match="multiple of the kbit block size 32"):
        kfmt.quantize(torch.randn(4, 48), 4)
    with pytest.raises(kfmt.KbitFormatError, match="supports bits in"):
        kfmt.quantize(torch.randn(4, 64), 6)
    bad = torch.randn(4, 64)
    bad[0, 0] = float("nan")
    with pytest.raises(kfmt.KbitFormatError, match="NaN"):
        kfmt.quantize(bad, 4)


@pytest.mark.parametrize("bits", BITS)
def test_packed_size_is_k_plus_quarter_bits(bits):
    n, k = 64, 4096
    q = kfmt.quantize(torch.randn(n, k), bits)
    stored = q.qweight.numel() * 4 + q.absmax.numel() + q.scale.numel() * 4
    assert stored == kfmt.packed_bytes(n, k, bits)
    assert (q.qweight.numel() * 4 + q.absmax.numel()) * 8 / (n * k) == bits + 0.25
