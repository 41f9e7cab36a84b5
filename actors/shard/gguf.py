"""GGUF checkpoints (llama.cpp's format): HF tensor names, per-rank lazy slices, dequantized on read."""
from __future__ import annotations

import re
from pathlib import Path

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from actors.shard.gguf_meta import read_spec
from actors.shard.layers import SliceIndex
from actors.shard.spec import ModelSpec

T = GGMLQuantizationType
# gguf.quants decodes more; these are the types checked against transformers' GGUF load or gguf's own quantizer.
SUPPORTED = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K)
# Weights per gguf.quants call: its float32 temporaries (a few times the output) stay in cache; 4x more doubled
# SmolLM2's decode time. Tensors this small go in one call, without a copy into a joint output.
WEIGHTS_PER_CALL = 1 << 18

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
CONSUMED = {"rope_freqs.weight"}  # folded into the spec (rope frequency factors), not a parameter
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def gguf_file(model: str | Path) -> Path | None:
    """The GGUF file `model` names (the file itself, or the one .gguf in a folder without config.json)."""
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model: GGUF file {str(path)!r} does not exist")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"model: {str(path)!r} holds {len(files)} GGUF files {[f.name for f in files]}; point "
                         "`model` at one of them (split GGUF files are not supported: merge them with "
                         "llama.cpp's llama-gguf-split --merge)")
    return files[0] if files else None


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Raw bytes [rows, blocks * block bytes] (uint8) -> float32 [rows, blocks * block weights], by gguf.quants."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    rows, width = raw.shape
    if width % nbytes:
        raise ValueError(f"{width} bytes per row is not a whole number of {qtype.name} blocks ({nbytes} B)")
    cols = width // nbytes * elems
    step = max(1, WEIGHTS_PER_CALL // max(cols, 1))
    if rows <= step:
        return _decode_run(raw, qtype)
    out = np.empty((rows, cols), dtype=np.float32)
    for r in range(0, rows, step):
        out[r:r + step] = _decode_run(raw[r:r + step], qtype)
    return out


def _decode_run(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Whole rows decoded in one gguf.quants call over them as one 1-D run of blocks."""
    # Over 2-D rows gguf.quants makes a numpy pass per 16 rows, which for narrow rows costs more than the
    # decoding: one tp=1 rank of SmolLM2 (Q4_1, 576-weight rows) loads in ~4.2 s CPU that way, ~3.4 s as runs
    # (python -m bench.gguf_load compares the two calls on every tensor).
    out = gguf.quants.dequantize(np.ascontiguousarray(raw).reshape(-1), qtype).reshape(len(raw), -1)
    return out if out.flags.writeable else out.copy()  # F32 comes back as a view of the read-only file


def hf_name(name: str) -> str | None:
    """Our (Hugging Face) parameter name for GGUF tensor `name`, or None if it has none."""
    m = LAYER_RE.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = GLOBAL_RE.fullmatch(name)
    if m and not m.group(1).startswith("blk") and m.group(1) in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rows(rows: int, head_dim: int) -> np.ndarray:
    """GGUF row index of every HF row of a llama q/k projection.

    llama.cpp's converter interleaves the two rotary halves of each head (HF row j < d/2 of a head is stored at
    2j, row d/2 + j at 2j + 1) for its own rope kernel; HF's rotate_half wants the halves back. The map stays
    inside each head, so a rank's whole heads are one contiguous run of GGUF rows.
    """
    half = head_dim // 2
    j = np.arange(rows) % head_dim
    return (np.arange(rows) - j) + 2 * (j % half) + j // half


class PlainReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map (same parser, same mapping).

    numpy's memmap subclass costs a finalizer call per slice, and the reader slices once per vocabulary string:
    that is half of its parse time for a 49k-token vocabulary.
    """

    @property  # type: ignore[override]  # a plain ndarray where gguf declares its memmap subclass
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


class GGUFSlice:
    """One GGUF tensor under its HF shape; indexing reads and dequantizes only the requested rows/blocks."""

    def __init__(self, name: str, raw: np.ndarray, qtype: GGMLQuantizationType, shape: list[int],
                 row_order: np.ndarray | None) -> None:
        self.name, self.qtype, self.shape, self.row_order = name, qtype, shape, row_order
        self.raw = raw.reshape(1, -1) if raw.ndim == 1 else raw  # [rows, bytes per row] uint8, memory-mapped

    def get_shape(self) -> list[int]:
        """Full HF shape ([out, in] for matrices)."""
        return list(self.shape)

    def __getitem__(self, index: SliceIndex) -> torch.Tensor:
        """float32 part of the tensor for `x[a:b]`, `x[:, a:b]`, `x[a:b, c:d]` or `x[:]`."""
        parts = index if isinstance(index, tuple) else (index,)
        if len(parts) > len(self.shape) or not all(isinstance(p, slice) and p.step in (None, 1) for p in parts):
            raise ValueError(f"GGUF tensor {self.name!r}: only contiguous slices are supported, got {index!r}")
        bounds = [p.indices(n)[:2] for p, n in zip(parts + (slice(None),) * 2, self.shape)]
        cols = bounds[-1]
        if len(self.shape) == 1:  # norms and biases: small, read whole (a q/k bias is permuted like its rows)
            full = self._read(0, 1, (0, self.shape[0]))[0]
            full = full if self.row_order is None else full[self.row_order]
            return torch.from_numpy(np.ascontiguousarray(full[cols[0]:cols[1]]))
        (r0, r1) = bounds[0]
        if self.row_order is None:
            return torch.from_numpy(self._read(r0, r1, cols))
        order = self.row_order[r0:r1]
        if len(order) == 0:
            return torch.empty(0, cols[1] - cols[0])
        lo = int(order.min())  # a rank's whole heads: exactly its own rows, reordered
        return torch.from_numpy(self._read(lo, int(order.max()) + 1, cols)[order - lo])

    def raw_blocks(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[str, np.ndarray] | None:
        """(type name, raw bytes [rows, blocks]) of HF rows/cols [r0, r1) x [c0, c1) of a matrix, as stored: for
        quant.keep. None where the columns do not fall on block boundaries."""
        elems, nbytes = GGML_QUANT_SIZES[self.qtype]
        (r0, r1), (c0, c1) = rows, cols
        if len(self.shape) != 2 or c0 % elems or c1 % elems:
            return None
        order = np.arange(r0, r1) if self.row_order is None else self.row_order[r0:r1]
        return self.qtype.name, np.ascontiguousarray(self.raw[order, c0 // elems * nbytes:c1 // elems * nbytes])

    def _read(self, r0: int, r1: int, cols: tuple[int, int]) -> np.ndarray:
        """Dequantize rows [r0, r1), columns [c0, c1), touching only the blocks that cover those columns.

        A column range aligned to the type's block (32 weights, 256 for K-quants) is read exactly; otherwise
        the covering blocks are (at most one extra block at each end) and the result is narrowed.
        """
        elems, nbytes = GGML_QUANT_SIZES[self.qtype]
        c0, c1 = cols
        b0, b1 = c0 // elems, -(-c1 // elems)  # covering blocks
        out = dequantize(self.raw[r0:r1, b0 * nbytes:b1 * nbytes], self.qtype)
        return out[:, c0 - b0 * elems:c1 - b0 * elems]


class GGUFCheckpoint:
    """A .gguf file as a checkpoint: HF tensor names, lazy slices, and the spec read from its metadata."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.reader = PlainReader(self.path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"model: {self.path} is not a readable GGUF file ({exc})") from exc
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._spec = read_spec(self.reader, self.path)
        self.names = self._map_names()
        self._check_tensors()

    def spec(self) -> ModelSpec:
        """The model's architecture numbers, from the file's metadata."""
        return self._spec

    def _map_names(self) -> dict[str, str]:
        """HF name -> GGUF name for every tensor; unknown names fail, naming them."""
        names, unknown = {}, []
        for name in self.tensors:
            if name in CONSUMED:
                continue
            hf = hf_name(name)
            if hf is None:
                unknown.append(name)
            else:
                names[hf] = name
        if unknown:
            raise ValueError(f"{self.path}: GGUF tensors {unknown[:20]} have no counterpart in a "
                             f"{self._spec.family} model; known per-layer names: blk.N.{{{','.join(LAYER_NAMES)}}}, "
                             f"global: {sorted(GLOBAL_NAMES)}")
        return names

    def _check_tensors(self) -> None:
        """Every tensor's type is one we decode and its shape is what the metadata implies."""
        bad = [f"{n} ({t.tensor_type.name})" for n, t in self.tensors.items() if t.tensor_type not in SUPPORTED]
        if bad:
            raise ValueError(f"{self.path}: GGUF tensor types not supported: {bad[:20]}; supported: "
                             f"{[t.name for t in SUPPORTED]} (re-quantize with llama.cpp's llama-quantize, "
                             "e.g. Q4_K_M)")
        expected = expected_shapes(self._spec)
        for hf, name in self.names.items():
            got = self.hf_shape(name)
            if hf in expected and got != expected[hf]:
                raise ValueError(f"{self.path}: GGUF tensor {name!r} ({hf}) has shape {got}, expected "
                                 f"{expected[hf]} from the file's metadata; the file is inconsistent")

    def hf_shape(self, name: str) -> list[int]:
        """HF shape of GGUF tensor `name` (GGUF lists dimensions fastest-first)."""
        return [int(d) for d in reversed(self.tensors[name].shape.tolist())]

    def keys(self) -> list[str]:
        """Every tensor under its HF name."""
        return sorted(self.names)

    def get_slice(self, key: str) -> GGUFSlice:
        """A lazy handle on HF tensor `key`."""
        name = self.names[key]
        t = self.tensors[name]
        raw = t.data if t.data.dtype == np.uint8 else t.data.view(np.uint8)  # F32/F16 come typed
        permuted = self._spec.family == "llama" and (".attn_q." in name or ".attn_k." in name)
        shape = self.hf_shape(name)
        order = unpermute_rows(shape[0], self._spec.head_dim) if permuted else None
        return GGUFSlice(name, raw, t.tensor_type, shape, order)


def expected_shapes(spec: ModelSpec) -> dict[str, list[int]]:
    """HF shape of every tensor a model with `spec` may hold."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    out = {"model.embed_tokens.weight": [spec.vocab_size, h], "model.norm.weight": [h],
           "lm_head.weight": [spec.vocab_size, h]}
    per_layer = {"input_layernorm.weight": [h], "post_attention_layernorm.weight": [h],
                 "self_attn.q_proj.weight": [q, h], "self_attn.k_proj.weight": [kv, h],
                 "self_attn.v_proj.weight": [kv, h], "self_attn.o_proj.weight": [h, q],
                 "self_attn.q_proj.bias": [q], "self_attn.k_proj.bias": [kv], "self_attn.v_proj.bias": [kv],
                 "self_attn.o_proj.bias": [h], "mlp.gate_proj.weight": [i, h], "mlp.up_proj.weight": [i, h],
                 "mlp.down_proj.weight": [h, i], "mlp.gate_proj.bias": [i], "mlp.up_proj.bias": [i],
                 "mlp.down_proj.bias": [h]}
    for n in range(spec.num_layers):
        out.update({f"model.layers.{n}.{k}": v for k, v in per_layer.items()})
    return out
