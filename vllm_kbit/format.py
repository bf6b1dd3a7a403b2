"""The kbit weight format: the one Python home of codebook, E4M4, bit-planes and kernel layouts.

``kernels/kbit_format.cuh`` mirrors every constant and bit layout defined here; change both together.

On disk, a linear weight ``W [N, K]`` (N output rows, K input features, K a multiple of 32) is:

* ``qweight`` int32 ``[N, K/32 * k]`` -- for every block of 32 consecutive weights along K, k words
  (bit-planes): bit ``j`` of plane ``b`` is bit ``b`` of the codebook index of weight ``j``.
  Word ``[n, kb * k + b]`` is plane ``b`` of block ``kb`` of row ``n``.
* ``qweight_absmax`` uint8 ``[N, K/32]`` -- each block's absmax, relative to the row scale, as E4M4.
* ``weight_scale`` float32 ``[N]`` -- per output row; ``row max absmax / 31`` so every block of the row
  fits E4M4's range without saturating.

A weight decodes as ``codebook[idx] * e4m4_decode(absmax) * weight_scale[n]``: k + 0.25 bits per weight
plus 4 bytes per row.

Codebook: the 2^k expected values of N(0, 1) over 2^k equal-probability bins, divided by the largest
magnitude (so it spans [-1, 1]) and sorted ascending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_SIZE = 32
SUPPORTED_BITS = (2, 3, 4, 5)

# E4M4: 4-bit exponent, 4-bit mantissa, exponent bias 11, subnormals at exponent 0, no inf/NaN.
E4M4_BIAS = 11
E4M4_MAX = 2.0 ** (15 - E4M4_BIAS) * (1 + 15 / 16)  # 31.0
E4M4_MIN_NORMAL = 2.0 ** (1 - E4M4_BIAS)  # 2^-10
E4M4_MIN_SUBNORMAL = E4M4_MIN_NORMAL / 16  # 2^-14 ~= 6.1e-5


class KbitFormatError(ValueError):
    """A tensor or setting that the kbit format cannot represent."""


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise KbitFormatError(
            f"kbit supports bits in {SUPPORTED_BITS}, got {bits!r}; pass one of them "
            "(e.g. --bits 4 or quantization_config.bits = 4)"
        )
    return int(bits)


def check_in_features(in_features: int, what: str = "weight") -> None:
    if in_features % BLOCK_SIZE:
        raise KbitFormatError(
            f"{what}: input size {in_features} is not a multiple of the kbit block size {BLOCK_SIZE}; "
            "skip this module (kbit-quantize --skip REGEX, or quantization_config.modules_to_not_convert)"
        )


# ---------------------------------------------------------------------------------------------------
# Codebook
# ---------------------------------------------------------------------------------------------------


def normal_float_codebook(bits: int) -> torch.Tensor:
    """float32 [2^bits]: E[Z | Z in bin i] for 2^bits equal-probability bins of N(0,1), scaled to [-1, 1]."""
    n = 1 << check_bits(bits)
    # Bin edges at the i/n quantiles; E[Z | a < Z < b] = (pdf(a) - pdf(b)) / (1/n).
    probs = torch.arange(1, n, dtype=torch.float64) / n
    inner = torch.special.ndtri(probs)
    edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), inner,
                       torch.tensor([math.inf], dtype=torch.float64)])
    pdf = torch.exp(-0.5 * edges.square()) / math.sqrt(2 * math.pi)
    pdf = torch.nan_to_num(pdf, nan=0.0)  # pdf(+-inf) = 0
    means = (pdf[:-1] - pdf[1:]) * n
    return (means / means.abs().max()).to(torch.float32)


def codebook_from_config(bits: int, codebook: list[float] | None) -> torch.Tensor:
    """The codebook a checkpoint names (validated), or the default normal-float one."""
    if codebook is None:
        return normal_float_codebook(bits)
    cb = torch.tensor(codebook, dtype=torch.float32)
    if cb.shape != (1 << bits,) or not torch.isfinite(cb).all() or cb.abs().max() > 1.0:
        raise KbitFormatError(
            f"codebook for bits={bits} must hold {1 << bits} finite values in [-1, 1]; got {list(codebook)}"
        )
    return cb


# ---------------------------------------------------------------------------------------------------
# E4M4 absmax
# ---------------------------------------------------------------------------------------------------


def e4m4_table() -> torch.Tensor:
    """float32 [256]: the value of every E4M4 code; increasing with the code."""
    code = torch.arange(256)
    exp, man = code >> 4, (code & 15).to(torch.float64)
    normal = torch.ldexp(1 + man / 16, exp - E4M4_BIAS)
    subnormal = torch.ldexp(man / 16, torch.full_like(exp, 1 - E4M4_BIAS))
    return torch.where(exp > 0, normal, subnormal).to(torch.float32)


def e4m4_decode(codes: torch.Tensor) -> torch.Tensor:
    return e4m4_table().to(codes.device)[codes.long()]


def e4m4_encode(values: torch.Tensor) -> torch.Tensor:
    """Round non-negative values to the nearest E4M4 code (ties go to the larger code). uint8."""
    if (values < 0).any() or not torch.isfinite(values).all():
        raise KbitFormatError("E4M4 encodes finite non-negative values only")
    if (values > E4M4_MAX).any():
        raise KbitFormatError(f"value {values.max().item():.6g} exceeds the E4M4 maximum {E4M4_MAX}")
    table = e4m4_table().to(values.device, torch.float64)
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(values.to(torch.float64), midpoints, right=True).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# Bit-planes
# ---------------------------------------------------------------------------------------------------


def pack_bitplanes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices [..., nblocks, 32] (values < 2^bits) -> int32 [..., nblocks * bits] bit-planes."""
    shifts = torch.arange(BLOCK_SIZE, device=indices.device, dtype=torch.int64)
    planes = [(((indices.to(torch.int64) >> b) & 1) << shifts).sum(-1) for b in range(bits)]
    words = torch.stack(planes, dim=-1)  # [..., nblocks, bits], values in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.flatten(-2)


def unpack_bitplanes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., nblocks * bits] -> uint8 indices [..., nblocks * 32]."""
    words = qweight.reshape(*qweight.shape[:-1], -1, bits).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(BLOCK_SIZE, device=qweight.device, dtype=torch.int64)
    bitsets = (words.unsqueeze(-1) >> shifts) & 1  # [..., nblocks, bits, 32]
    weights = (1 << torch.arange(bits, device=qweight.device, dtype=torch.int64)).view(bits, 1)
    idx = (bitsets * weights).sum(-2)  # [..., nblocks, 32]
    return idx.to(torch.uint8).flatten(-2)


# ---------------------------------------------------------------------------------------------------
# Quantize / dequantize (reference, any device)
# ---------------------------------------------------------------------------------------------------


@dataclass
class KbitTensor:
    """One quantized weight in the on-disk layout (see module docstring)."""

    qweight: torch.Tensor  # int32 [..., N, K/32*bits]
    absmax: torch.Tensor  # uint8 [..., N, K/32]
    scale: torch.Tensor  # float32 [..., N]
    bits: int

    @property
    def in_features(self) -> int:
        return self.absmax.shape[-1] * BLOCK_SIZE


def quantize(weight: torch.Tensor, bits: int, codebook: torch.Tensor | None = None) -> KbitTensor:
    """Quantize ``weight [..., N, K]`` (leading dims e.g. experts) along K to the on-disk layout."""
    check_bits(bits)
    *lead, n, k = weight.shape
    check_in_features(k)
    if not torch.isfinite(weight).all():
        raise KbitFormatError("weight holds inf or NaN values; kbit cannot quantize it")
    cb = (normal_float_codebook(bits) if codebook is None else codebook).to(weight.device, torch.float32)
    rows = weight.reshape(-1, k)
    # Row chunks bound the float32/int64 temporaries to a few times QUANTIZE_CHUNK elements.
    step = max(1, QUANTIZE_CHUNK // k)
    parts = [_quantize_rows(rows[i:i + step], bits, cb) for i in range(0, rows.shape[0], step)]
    qweight, absmax, scale = (torch.cat(p).reshape(*lead, n, -1) for p in zip(*parts))
    return KbitTensor(qweight, absmax, scale.reshape(*lead, n), bits)


QUANTIZE_CHUNK = 1 << 22


def _quantize_rows(rows: torch.Tensor, bits: int, cb: torch.Tensor):
    w = rows.float().reshape(rows.shape[0], -1, BLOCK_SIZE)
    block_max = w.abs().amax(-1)
    row_max = block_max.amax(-1)
    # Divide by a tensor, not a Python scalar: CUDA turns scalar division into a multiply by the
    # reciprocal, which rounds differently from the CPU and would make GPU and CPU quantization differ.
    scale = torch.where(row_max > 0, row_max / torch.full_like(row_max, E4M4_MAX), torch.ones_like(row_max))
    absmax = e4m4_encode((block_max / scale.unsqueeze(-1)).clamp(max=E4M4_MAX))
    block_scale = e4m4_decode(absmax) * scale.unsqueeze(-1)
    normalized = w / torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale)).unsqueeze(-1)
    idx = torch.bucketize(normalized.contiguous(), (cb[1:] + cb[:-1]) / 2)
    return pack_bitplanes(idx, bits), absmax, scale.unsqueeze(-1)


def dequantize(t: KbitTensor, codebook: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference decode of the on-disk layout to ``[..., N, K]``, computed in float32."""
    cb = (normal_float_codebook(t.bits) if codebook is None else codebook).to(t.qweight.device, torch.float32)
    idx = unpack_bitplanes(t.qweight, t.bits)
    values = cb[idx.long()].reshape(*t.absmax.shape, BLOCK_SIZE)
    block_scale = e4m4_decode(t.absmax) * t.scale.float().unsqueeze(-1)
    return (values * block_scale.unsqueeze(-1)).flatten(-2).to(dtype)


def packed_bytes(n: int, k: int, bits: int) -> int:
    """Bytes a [n, k] weight takes in the kbit format (planes + absmax + row scales)."""
    return n * k * bits // 8 + n * k // BLOCK_SIZE + 4 * n


# ---------------------------------------------------------------------------------------------------
# Kernel layout
# ---------------------------------------------------------------------------------------------------
# The CUDA kernels (kernels/, constants mirrored in kernels/kbit_format.cuh) read a copy re-packed once at
# load time. The weight is cut into tiles of KERNEL_TILE_ROWS = 32 rows x KERNEL_TILE_K = 128 inputs (4 blocks),
# each read by one warp in one step. Lane l = 4 G + c of the warp (G = l // 4, c = l % 4) owns 128 weights of a
# tile: rows G + 8 j (j = 0..3) and inputs 32 b + 8 c + t (block b = 0..3, t = 0..7). These are the weights whose
# tensor-core operand fragments the lane holds (mma.sync m16n8k16, A operand: "groupID" G, "threadID_in_group"
# c) when block b is multiplied as two 16-row halves x two 16-input steps, step s taking inputs 8 c + 4 s + 0..3
# from lane c (a permutation of the inputs within the block, applied to the activations too).
#
# * qweight_tiled int32 [..., N/32, G, bits, 32, 4] with G = ceil(K/128): lane l's 128 codebook indices in the
#   order of the operand fragments: with j = 2 rh + h (row half rh, row h in it) and t = 4 s + 2 q + e (step s,
#   register pair q, element e), weight number i = 32 b + 16 rh + 8 s + 4 q + 2 h + e sits at stream bits
#   [bits*i, bits*i + bits) of a little-endian bit stream; stream word w is stored at [..., v = w // 4, l, w % 4],
#   so vector v of all 32 lanes is 512 contiguous bytes (one coalesced 16-byte load per lane). The indices of
#   weights t, t + 1 of a row (e = 0, 1) are one contiguous field, which the kernel uses whole as a lookup-table
#   key; for k=2 the key is rows 2 rh, 2 rh + 1 x inputs t, t + 1 (h, e = 0, 1), whose four values are the two A
#   registers that the MMA takes side by side, so one 8-byte table read fills both.
# * absmax_tiled uint8 [..., N/32, G, 32, 4]: entry [..., 4 G + b, j] is the E4M4 code of row G + 8 j, block b,
#   so lane l reads the codes of its 4 rows x 4 blocks with one 16-byte load.
#
# K is padded to a multiple of 128 with index 0 and absmax code 0 (E4M4 0.0), so padding contributes 0.

KERNEL_TILE_ROWS = 32
KERNEL_TILE_K = 128
KERNEL_TILE_BLOCKS = KERNEL_TILE_K // BLOCK_SIZE
KERNEL_LANES = 32
# A row index r in a tile is (j, G) = divmod(r, 8), an input i is (b, c, t) = (i // 32, i // 8 % 4, i % 8); the
# stream splits j into (rh, h) and t into (s, q, e), two values each.
_ROW_J, _ROW_G = 4, 8
_IN_C = 4
_HALF = 2
# A weight's indices viewed as [rowtile, rh, h, G, group, b, c, s, q, e], permuted into the lanes' streams
# [rowtile, group, G, c, b, rh, s, q, h, e] (kbit_format.cuh stream_index); from_kernel_layout applies the inverse.
_TO_STREAM = (0, 4, 3, 6, 5, 1, 7, 8, 2, 9)
_FROM_STREAM = tuple(_TO_STREAM.index(axis) for axis in range(len(_TO_STREAM)))


def kernel_k_groups(in_features: int) -> int:
    """G: the number of KERNEL_TILE_K-wide column tiles (K padded up to a multiple of KERNEL_TILE_K)."""
    return -(-in_features // KERNEL_TILE_K)


def _kernel_row_chunk(groups: int, bits: int) -> int:
    # rows converted at a time: bounds the int64 bit tensors to ~64 MiB whatever the weight size
    return max(KERNEL_TILE_ROWS, (2**23 // (groups * KERNEL_TILE_K * bits)) // KERNEL_TILE_ROWS * KERNEL_TILE_ROWS)


def to_kernel_layout(t: KbitTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The on-disk ``t`` re-packed into the kernel layout: (qweight_tiled int32, absmax_tiled uint8).

    Runs on t's device (CPU or GPU); the row scale and the codebook are used unchanged.
    """
    bits = check_bits(t.bits)
    *lead, n, nblocks = t.absmax.shape
    if n % KERNEL_TILE_ROWS:
        raise KbitFormatError(
            f"the kbit kernels need the output size to be a multiple of {KERNEL_TILE_ROWS}, got {n}")
    groups = kernel_k_groups(nblocks * BLOCK_SIZE)
    qweight = t.qweight.reshape(-1, nblocks * bits)
    absmax = t.absmax.reshape(-1, nblocks)
    rows = qweight.shape[0]
    dev = qweight.device
    stream_bits = torch.arange(bits, device=dev, dtype=torch.int64)
    word_bits = torch.arange(32, device=dev, dtype=torch.int64)
    tiled = torch.empty(rows // KERNEL_TILE_ROWS, groups, KERNEL_LANES, 4 * bits, dtype=torch.int32, device=dev)
    step = _kernel_row_chunk(groups, bits)
    for r0 in range(0, rows, step):
        idx = unpack_bitplanes(qweight[r0:r0 + step], bits).to(torch.int64)
        idx = torch.nn.functional.pad(idx, (0, groups * KERNEL_TILE_K - idx.shape[-1]))
        # -> [rowtile, group, lane = (G, c), stream]
        idx = (idx.view(-1, _HALF, _HALF, _ROW_G, groups, KERNEL_TILE_BLOCKS, _IN_C, _HALF, _HALF, _HALF)
               .permute(_TO_STREAM).reshape(-1, groups, KERNEL_LANES, KERNEL_TILE_K, 1))
        stream = ((idx >> stream_bits) & 1).view(-1, groups, KERNEL_LANES, 4 * bits, 32)
        words = (stream << word_bits).sum(-1)  # [rowtiles, G, lanes, 4*bits] in [0, 2^32)
        tiled[r0 // KERNEL_TILE_ROWS:(r0 + step) // KERNEL_TILE_ROWS] = (
            torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
    qweight_tiled = (tiled.view(-1, groups, KERNEL_LANES, bits, 4).permute(0, 1, 3, 2, 4)
                     .reshape(*lead, n // KERNEL_TILE_ROWS, groups, bits, KERNEL_LANES, 4).contiguous())
    absmax = torch.nn.functional.pad(absmax, (0, groups * KERNEL_TILE_BLOCKS - nblocks))
    # [rowtile, j, G, group, b] -> [rowtile, group, (G, b), j]
    absmax_tiled = (absmax.view(-1, _ROW_J, _ROW_G, groups, KERNEL_TILE_BLOCKS).permute(0, 3, 2, 4, 1)
                    .reshape(*lead, n // KERNEL_TILE_ROWS, groups, KERNEL_LANES, _ROW_J).contiguous())
    return qweight_tiled, absmax_tiled


def from_kernel_layout(qweight_tiled: torch.Tensor, absmax_tiled: torch.Tensor, scale: torch.Tensor,
                       bits: int, in_features: int) -> KbitTensor:
    """Inverse of ``to_kernel_layout``: back to the on-disk layout (drops the K padding)."""
    bits = check_bits(bits)
    check_in_features(in_features)
    *lead, rowtiles, groups, _, _, _ = qweight_tiled.shape
    n = rowtiles * KERNEL_TILE_ROWS
    nblocks = in_features // BLOCK_SIZE
    dev = qweight_tiled.device
    words = (qweight_tiled.reshape(-1, groups, bits, KERNEL_LANES, 4).permute(0, 1, 3, 2, 4)
             .reshape(-1, groups, KERNEL_LANES, 4 * bits))
    stream_bits = torch.arange(bits, device=dev, dtype=torch.int64)
    word_bits = torch.arange(32, device=dev, dtype=torch.int64)
    qweight = torch.empty(rowtiles * math.prod(lead), KERNEL_TILE_ROWS, nblocks * bits, dtype=torch.int32,
                          device=dev)
    step = _kernel_row_chunk(groups, bits) // KERNEL_TILE_ROWS
    for t0 in range(0, words.shape[0], step):
        chunk = words[t0:t0 + step].to(torch.int64) & 0xFFFFFFFF
        stream = ((chunk.unsqueeze(-1) >> word_bits) & 1).view(-1, groups, KERNEL_LANES, KERNEL_TILE_K, bits)
        idx = (stream << stream_bits).sum(-1)  # [rowtiles, G, lane = (G, c), stream]
        idx = (idx.view(-1, groups, _ROW_G, _IN_C, KERNEL_TILE_BLOCKS, _HALF, _HALF, _HALF, _HALF, _HALF)
               .permute(_FROM_STREAM)
               .reshape(-1, KERNEL_TILE_ROWS, groups * KERNEL_TILE_K)[..., :in_features])
        qweight[t0:t0 + step] = pack_bitplanes(idx.reshape(-1, KERNEL_TILE_ROWS, nblocks, BLOCK_SIZE), bits)
    absmax = (absmax_tiled.reshape(-1, groups, _ROW_G, KERNEL_TILE_BLOCKS, _ROW_J).permute(0, 4, 2, 1, 3)
              .reshape(-1, groups * KERNEL_TILE_BLOCKS)[:, :nblocks])
    return KbitTensor(qweight.reshape(*lead, n, nblocks * bits), absmax.reshape(*lead, n, nblocks).contiguous(),
                      scale, bits)
