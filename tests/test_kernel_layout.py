"""The kernel layout (format.to_kernel_layout) on CPU: round trip and the lane map the CUDA kernels decode."""

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


def test_round_trip_in_several_chunks(monkeypatch):
    # to/from_kernel_layout convert large weights a few row tiles at a time
    monkeypatch.setattr(kf, "_kernel_row_chunk", lambda groups, bits: 64)
    t = kf.quantize(_weight((160, 288), 3), 3)
    back = kf.from_kernel_layout(*kf.to_kernel_layout(t), t.scale, 3, 288)
    assert torch.equal(back.qweight, t.qweight) and torch.equal(back.absmax, t.absmax)


@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
def test_lane_map(bits):
    """Weight (row, col) is index 32 b + 16 (j // 2) + 8 (t // 4) + 4 (t // 2 % 2) + 2 (j % 2) + t % 2 of lane
    4 G + c's bit stream in tile (row // 32, col // 128), with row % 32 = 8 j + G and col % 128 = 32 b + 8 c + t;
    its block's absmax code is byte j of entry 4 G + b."""
    n, k = 64, 288  # K padded to 384: the last tile is part padding
    t = kf.quantize(_weight((n, k), 10 + bits), bits)
    qweight_tiled, absmax_tiled = kf.to_kernel_layout(t)
    indices = kf.unpack_bitplanes(t.qweight, bits).long()
    for rowtile, g in [(0, 0), (1, 1), (1, 2)]:
        for lane in range(32):
            G, c = divmod(lane, 4)
            words = qweight_tiled[rowtile, g, :, lane, :].reshape(-1).long() & 0xFFFFFFFF
            stream = sum(int(word) << (32 * w) for w, word in enumerate(words))
            for b in range(4):
                for j in range(4):
                    row = 32 * rowtile + 8 * j + G
                    block = 4 * g + b
                    code = int(absmax_tiled[rowtile, g, 4 * G + b, j])
                    assert code == (int(t.absmax[row, block]) if block < k // 32 else 0)
                    for tt in range(8):
                        col = 128 * g + 32 * b + 8 * c + tt
                        expected = int(indices[row, col]) if col < k else 0
                        i = 32 * b + 16 * (j // 2) + 8 * (tt // 4) + 4 * (tt // 2 % 2) + 2 * (j % 2) + tt % 2
                        assert (stream >> (bits * i)) & ((1 << bits) - 1) == expected


def test_rejects_rows_not_multiple_of_tile():
    t = kf.quantize(_weight((48, 64), 0), 4)
    with pytest.raises(kf.KbitFormatError, match="multiple of 32"):
        kf.to_kernel_layout(t)
