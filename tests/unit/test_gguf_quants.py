"""GGUF dequantization in runs of rows against the gguf package's plain call, and per-rank slice reads."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES as BLOCKS
from gguf import GGMLQuantizationType as T

import actors.shard.gguf as gg
from actors.shard.gguf import GGUFCheckpoint, GGUFSlice, dequantize, unpermute_rows
from tests.gguf_files import interleave_heads

ALL = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZABLE = [T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]  # the gguf package can write these itself
# Byte offsets of each block's float16 scales: random bytes there could be inf/NaN, so they get real values.
SCALE_AT = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_blocks(qtype: T, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """Valid random raw data [rows, blocks * block bytes]: every code pattern, finite scales."""
    rng = np.random.default_rng(seed)
    _, nbytes = BLOCKS[qtype]
    w = rng.standard_normal((rows, blocks)).astype(np.float32)
    if qtype in (T.F32, T.F16):
        return w.astype(np.float16 if qtype == T.F16 else np.float32).view(np.uint8)
    if qtype == T.BF16:
        return gguf.quants.quantize(w, T.BF16)
    raw = rng.integers(0, 256, size=(rows, blocks, nbytes), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        raw[:, :, at:at + 2] = (rng.standard_normal((rows, blocks, 1)) * 0.05).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks * nbytes)


@pytest.mark.parametrize("per_call", [1 << 18, 64], ids=["one-call", "runs-of-rows"])
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_random_blocks_decode_like_gguf(monkeypatch: pytest.MonkeyPatch, qtype: T, per_call: int) -> None:
    """Every type decodes random valid blocks bit for bit as gguf.quants.dequantize does on 2-D rows, whole or
    split into several calls, and the result is a writable array of its own (not a view of the file)."""
    monkeypatch.setattr(gg, "WEIGHTS_PER_CALL", per_call)
    raw = random_blocks(qtype, 6, 4)
    ours, ref = dequantize(raw[:, :-BLOCKS[qtype][1]], qtype), gguf.quants.dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == (6, 3 * BLOCKS[qtype][0])
    np.testing.assert_array_equal(ours, ref[:, :3 * BLOCKS[qtype][0]].astype(np.float32))
    assert ours.flags.writeable and not np.shares_memory(ours, raw)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_weights_decode_like_gguf(qtype: T) -> None:
    """Weights the gguf package quantizes come back as its own decoder gives them (and near the originals)."""
    w = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    ours = dequantize(raw, qtype)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    assert np.abs(ours - w).max() < 0.5  # 4-bit codes of N(0, 1) weights: within one quantization step


def test_partial_blocks_are_refused() -> None:
    """A row that is not a whole number of blocks is a ValueError naming the type."""
    with pytest.raises(ValueError, match="Q4_K"):
        dequantize(np.zeros((1, 100), dtype=np.uint8), T.Q4_K)


def make_slice(qtype: T, rows: int, cols: int) -> tuple[GGUFSlice, np.ndarray]:
    """A slice over random `qtype` data [rows, cols] and its full reference dequantization."""
    raw = random_blocks(qtype, rows, cols // BLOCKS[qtype][0], seed=2)
    return GGUFSlice("t", raw, qtype, [rows, cols], None), gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("index", [np.s_[:], np.s_[3:7], np.s_[:, 256:512], np.s_[:, 100:300], np.s_[2:5, 32:64]],
                         ids=["all", "rows", "aligned-cols", "unaligned-cols", "both"])
def test_slices_equal_slicing_the_full_tensor(qtype: T, index: object) -> None:
    """Row, column and mixed slices give exactly the matching part of the fully decoded tensor."""
    src, full = make_slice(qtype, 8, 768)
    np.testing.assert_array_equal(src[index].numpy(), full[index])


@pytest.mark.parametrize("qtype,cols,touched", [(T.Q4_K, (256, 512), 144), (T.Q8_0, (64, 96), 34),
                                                (T.Q4_K, (100, 300), 2 * 144)],
                         ids=["k-aligned", "q8-aligned", "k-unaligned"])
def test_a_rank_decodes_only_its_rows_and_blocks(monkeypatch: pytest.MonkeyPatch, qtype: T,
                                                 cols: tuple[int, int], touched: int) -> None:
    """The decoder is handed only the requested rows and the blocks covering the requested columns."""
    seen: list[tuple[int, ...]] = []
    real = gg.dequantize
    monkeypatch.setattr(gg, "dequantize", lambda raw, q: (seen.append(raw.shape), real(raw, q))[1])
    src, _ = make_slice(qtype, 8, 768)
    src[2:5]
    src[:, cols[0]:cols[1]]
    assert seen == [(3, 768 // BLOCKS[qtype][0] * BLOCKS[qtype][1]), (8, touched)]


def test_unpermute_inverts_llama_cpp_interleave() -> None:
    """The reader's row map undoes the converter's q/k interleave, head by head."""
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(48, 3)  # 6 heads of head_dim 8
    stored = interleave_heads(w, 6)
    assert not np.array_equal(stored, w)
    np.testing.assert_array_equal(stored[unpermute_rows(48, 8)], w)
    src = GGUFSlice("q", stored.view(np.uint8), T.F32, [48, 3], unpermute_rows(48, 8))
    np.testing.assert_array_equal(src[16:32].numpy(), w[16:32])  # a rank's two heads
    bias = np.arange(48, dtype=np.float32)  # llama q/k biases are interleaved like their rows
    src = GGUFSlice("b", interleave_heads(bias, 6).view(np.uint8), T.F32, [48], unpermute_rows(48, 8))
    np.testing.assert_array_equal(src[8:24].numpy(), bias[8:24])


def test_unsupported_type_is_named(tmp_path: Path) -> None:
    """A tensor type we do not decode fails at open, naming the tensor, the type and what is supported."""
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("token_embd.weight", gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q5_0), raw_dtype=T.Q5_0)
    for key, value in [("context_length", 64), ("embedding_length", 64), ("block_count", 0),
                       ("feed_forward_length", 128), ("attention.head_count", 4)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"token_embd\.weight \(Q5_0\).*Q4_K"):
        GGUFCheckpoint(tmp_path / "m.gguf")
