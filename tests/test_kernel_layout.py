"""The kernel layout (format.to_kernel_layout) on CPU: round trip and the bit stream the CUDA kernels decode."""

import pytest
import torch

from vllm_kbit import format as kf


def _weight(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(192, 576), (64, 2048), (32, 32), (2, 64, 160)])  # last: 2 experts
def test_round_trip(bits, shape):
    t = kf.quantize(_weight(shape, bits), bits)
    qweight_tiled, absmax_tiled = kf.to_kernel_layout(t)
    groups = kf.kernel_k_groups(shape[-1])
    assert qweight_tiled.shape == (*shape[:-2], shape[-2] // 32, groups, bits, 32, 4)
    assert absmax_tiled.shape == (*shape[:-2], shape[-2] // 32, groups, 32, 4)
    back = kf.from_kernel_layout(qweight_tiled, absmax_tiled, t.scale, bits, shape[-1])
    assert torch.equal(back.qweight, t.qweight)
    assert torch.equal(back.absmax, t.absmax)


@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
def test_index_stream(bits):
    """Row r's 4*bits words of tile g hold its 128 indices as a little-endian stream, bits*i.. for index i."""
    n, k = 64, 288  # K padded to 384: the last tile is part padding
    t = kf.quantize(_weight((n, k), 10 + bits), bits)
    qweight_tiled, absmax_tiled = kf.to_kernel_layout(t)
    indices = kf.unpack_bitplanes(t.qweight, bits).long()
    for row, g in [(0, 0), (37, 1), (63, 2)]:
        words = qweight_tiled[row // 32, g, :, row % 32, :].reshape(-1).long() & 0xFFFFFFFF
        stream = sum(int(word) << (32 * j) for j, word in enumerate(words))
        for i in range(128):
            col = g * 128 + i
            expected = int(indices[row, col]) if col < k else 0
            assert (stream >> (bits * i)) & ((1 << bits) - 1) == expected
        codes = absmax_tiled[row // 32, g, row % 32].tolist()
        assert codes == [int(t.absmax[row, 4 * g + b]) if 4 * g + b < k // 32 else 0 for b in range(4)]


def test_rejects_rows_not_multiple_of_tile():
    t = kf.quantize(_weight((48, 64), 0), 4)
    with pytest.raises(kf.KbitFormatError, match="multiple of 32"):
        kf.to_kernel_layout(t)
