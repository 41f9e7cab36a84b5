"""vLLM side of `bench.peer`, run by the peer venv's python (never imported by the project).

python bench/peer_vllm.py '{"model": DIR, "tp": 1, "quick": false}'  -> one JSON line on stdout (after "RESULT ")
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder leads sys.path, and its siblings (kernels.py, engine.py, ...) would shadow
# packages of the same name; drop it and load the shared workloads module by path instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("peer_workloads", HERE / "peer_workloads.py")
peer_workloads = sys.modules["peer_workloads"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_workloads)
make_prompts, vocab_size, workloads = peer_workloads.make_prompts, peer_workloads.vocab_size, peer_workloads.workloads


def main() -> None:
    """Start one LLM, warm it up, time every workload at each of its output lengths, print the result."""
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(model=args["model"], dtype="float32", skip_tokenizer_init=True, max_model_len=512, max_num_seqs=64,
              tensor_parallel_size=args["tp"], seed=0)
    vocab = vocab_size(args["model"])

    def run(prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        assert all(len(t) == new for t in tokens), "vLLM stopped early"
        return wall, tokens

    run(make_prompts(4, 32, vocab, 999), 8)  # warm-up (compiled graphs for small batches, caches)
    results = []
    for salt, w in enumerate(workloads(args["quick"])):
        walls, first = [], None
        run(make_prompts(w.streams, 16, vocab, 500 + salt), 4)  # warm-up at this batch size
        for k, new in enumerate(w.new):
            best = float("inf")
            for rep in range(args.get("repeats", 1)):  # the fastest of a few: contention from other work only adds
                wall, tokens = run(make_prompts(w.streams, w.prompt, vocab, 100 * salt + 10 * k + rep), new)
                best = min(best, wall)
                first = first or tokens[0]
            walls.append(best)
        results.append({"workload": w.name, "walls": walls, "tokens_per_s": w.rate(walls), "first_tokens": first})
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps that child from re-running main()
    main()
