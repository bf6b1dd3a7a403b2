"""Run one vLLM engine in a fresh process and print greedy results as JSON (used by the e2e tests).

Each engine gets its own process so engines never share state, and a failing load surfaces as the
process's stderr, which tests can match against the error message a user would see.

    python tests/vllm_runner.py '{"model": "...", "prompts": [[1, 2, 3]], "max_tokens": 8}'
"""

import json
import sys


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    engine_args = {
        "model": spec["model"],
        "enforce_eager": spec.get("enforce_eager", True),
        "dtype": spec.get("dtype", "bfloat16"),
        "max_model_len": spec.get("max_model_len", 512),
        "gpu_memory_utilization": spec.get("gpu_memory_utilization", 0.25),
        "tensor_parallel_size": spec.get("tp", 1),
        "seed": 0,
    }
    for key in ("quantization", "hf_overrides", "load_format", "skip_tokenizer_init", "compilation_config"):
        if key in spec:
            engine_args[key] = spec[key]
    llm = LLM(**engine_args)
    prompts = [{"prompt_token_ids": ids} for ids in spec.get("prompts", [])]
    prompts += spec.get("text_prompts", [])
    result = {"outputs": []}
    if spec.get("max_tokens", 0):
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=1,
                                ignore_eos=spec.get("ignore_eos", True))
        for out in llm.generate(prompts, params, use_tqdm=False):
            completion = out.outputs[0]
            result["outputs"].append({
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "text": completion.text,
                "logprobs": [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)],
            })
    if spec.get("score"):  # teacher-forced: is each given continuation token this model's top-1?
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        scored = [{"prompt_token_ids": ids} for ids in spec["score"]]
        result["scores"] = []
        for out in llm.generate(scored, params, use_tqdm=False):
            ranks = [None if lp is None else lp[t].rank for lp, t in zip(out.prompt_logprobs, out.prompt_token_ids)]
            result["scores"].append(ranks)
    return result


if __name__ == "__main__":
    print("KBIT-RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
