"""GGUF blocks kept beside the float32 copy: the C matmul over them, and a model that runs its steps on them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from actors.shard import cpu_gemm, matmul_plan, quant
from actors.shard.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear
from actors.shard.matmul_plan import MatmulPlan
from deployments.make_model import write_model
from tests.configs import VARIANTS
from tests.gguf_files import write_gguf
from tests.local_grid import LocalGrid
from tests.reference import PROMPTS, grid_greedy, prefill_logits

pytestmark = pytest.mark.skipif(not quant.available(), reason="the C kernels did not build with SIMD here")
QTYPES = ["Q4_1", "Q8_0"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_decode_exactly_to_the_float32_copy(qtype: str) -> None:
    """One-hot tokens read single weights back: bit for bit what gguf's own decoder gives."""
    gen = torch.Generator().manual_seed(0)
    blocks = quant.quantize(torch.randn(37, 96, generator=gen), qtype)
    want = quant.dequantize(blocks)
    got = quant.matmul(torch.eye(96), blocks)  # [96 tokens, 37 rows]
    assert torch.equal(got, want.T.contiguous())


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 13, 16, 17, 33])
@pytest.mark.parametrize("rows,width", [(37, 64), (256, 1440)])  # odd rows; 45 blocks: runs of 15 (RUN_BLOCKS)
def test_matmul_equals_the_float32_linear(qtype: str, tokens: int, rows: int, width: int) -> None:
    """Every token group and row remainder of the kernel, with a bias, against F.linear on the decoded weight."""
    gen = torch.Generator().manual_seed(tokens)
    blocks = quant.quantize(torch.randn(rows, width, generator=gen), qtype)
    x, bias = torch.randn(tokens, width, generator=gen), torch.randn(rows, generator=gen)
    want = F.linear(x.double(), quant.dequantize(blocks).double(), bias.double())
    got = quant.matmul(x, blocks, bias)
    assert got.shape == (tokens, rows)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_a_wrong_width_is_refused() -> None:
    blocks = quant.quantize(torch.randn(8, 64), "Q4_1")
    with pytest.raises(ValueError, match=r"expected float32 \[T, 64\]"):
        quant.matmul(torch.randn(2, 32), blocks)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_hf")
    return {name: write_model(root / name, VARIANTS[name][0], seed=2, tokenizer=False, **VARIANTS[name][1])
            for name in ("qwen2_bias", "llama_tied_mqa")}


def block_types(name: str, data: np.ndarray) -> T:
    """The bundled SmolLM2's layout: Q8_0 embedding (tied head), Q4_1 matrices, F32 norms and biases."""
    return T.Q8_0 if name == "token_embd.weight" else T.Q4_1 if data.ndim == 2 else T.F32


@pytest.mark.parametrize("name,tp", [("qwen2_bias", 2), ("llama_tied_mqa", 4)])
def test_a_gguf_model_steps_on_its_blocks(hf_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          name: str, tp: int) -> None:
    """Each linear whose rank slice is whole blocks keeps them (tp=4: o_proj's 16 columns are not, a padded
    vocabulary's rows are zero blocks) and, where its plan says so, steps on them: HF-close logits, same tokens."""
    path = write_gguf(hf_dirs[name], tmp_path / "q.gguf", qtype=block_types)
    plain = LocalGrid(str(path), tp, 1)  # small weights: fixed float32 paths, no blocks kept
    assert quant.quant_bytes(plain.stages[0][0].model) == 0
    monkeypatch.setattr(cpu_gemm, "PACK_MIN_ELEMENTS", 1)
    monkeypatch.setattr(matmul_plan, "_calibrated", lambda hidden, rows, paths, threads, qtype: MatmulPlan(
        (512,), ("quant" if "quant" in paths else "torch",)))
    calls = []
    real = quant.matmul
    monkeypatch.setattr(quant, "matmul", lambda *a: calls.append(1) or real(*a))
    grid = LocalGrid(str(path), tp, 1)
    for runner in grid.stages[0]:
        for m in runner.model.modules():
            if isinstance(m, RowParallelLinear):
                assert (m.quant is not None) == (m.weight.shape[1] % quant.BLOCK == 0)
            elif isinstance(m, ColumnParallelLinear | ParallelLMHead):
                assert m.quant is not None and m.quant.out_features == m.weight.shape[0]
    for prompt in PROMPTS:
        want, got = prefill_logits(plain, prompt), prefill_logits(grid, prompt)
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert calls
    assert grid_greedy(grid, PROMPTS, 6, block_size=4) == grid_greedy(plain, PROMPTS, 6, block_size=4)


def test_a_float32_checkpoint_keeps_no_blocks(hf_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_gemm, "PACK_MIN_ELEMENTS", 1)
    grid = LocalGrid(str(hf_dirs["qwen2_bias"]), 1, 1)
    assert quant.quant_bytes(grid.stages[0][0].model) == 0


@pytest.mark.parametrize("blocks_faster", [True, False])
def test_a_whole_model_pass_moves_few_token_counts_onto_the_blocks(
        hf_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocks_faster: bool) -> None:
    """Timed per weight, PyTorch's GEMM won everywhere; where a pass over every linear runs faster on the blocks
    (here: says so), the buckets up to PASS_MAX_TOKENS take them, and only those."""
    path = write_gguf(hf_dirs["qwen2_bias"], tmp_path / "q.gguf", qtype=block_types)
    monkeypatch.setattr(cpu_gemm, "PACK_MIN_ELEMENTS", 1)
    monkeypatch.setattr(matmul_plan, "_calibrated", lambda hidden, rows, paths, threads, qtype: MatmulPlan(
        matmul_plan.BUCKETS, ("torch",) * len(matmul_plan.BUCKETS)))
    seen = []

    def verdict(entry: str, times: dict) -> dict:
        seen.append(entry)
        n = len(times["timed"])
        return {"timed": [1.0] * n, "blocks": [0.5 if blocks_faster else 2.0] * n}

    monkeypatch.setattr(matmul_plan.plan_times, "merged", verdict)
    runner = LocalGrid(str(path), 1, 1).stages[0][0]
    want = tuple("quant" if blocks_faster and t <= matmul_plan.PASS_MAX_TOKENS else "torch"
                 for t in matmul_plan.BUCKETS)
    linears = [m for m in runner.model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    assert seen and all(m.plan is not None and m.plan.paths == want for m in linears)
    assert all((m.quant is not None) == blocks_faster for m in linears)  # unused blocks freed


@pytest.mark.parametrize("use", [True, False])
def test_recorded_blocks_are_joined_or_dropped(use: bool) -> None:
    """A CPU worker joins the recorded parts into the linear's blocks; a CUDA one (use=False) only drops them."""
    blocks = quant.quantize(torch.randn(8, 64), "Q8_0")

    class Source:
        def raw_blocks(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[str, np.ndarray]:
            return "Q8_0", blocks.data.numpy()[rows[0]:rows[1]]

    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(quant.dequantize(blocks), requires_grad=False)
    m.quant = None
    quant.keep(m, 0, Source(), (0, 8), (0, 64))
    assert quant.finalize(m, use=use) == int(use)
    assert quant.PARTS not in m.__dict__
    assert (m.quant is not None) == use and (not use or torch.equal(m.quant.data, blocks.data))
