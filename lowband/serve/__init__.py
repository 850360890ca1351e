"""Inference over slow links: `lowband generate` (docs/inference.md).

The map:
- config.py     GenerateConfig (the flags) and validate_generate (every refusal, one place)
- sampling.py   greedy, temperature, top-p; a seeded sampler per request
- engine.py     the model with its KV cache, the decode loop, TTFT/TBT timings, the text sink
- allreduce.py  ring and star all-reduce for tensor parallel, and the link model's prediction
- tp.py         tensor parallel: one worker's shard of heads and FFN columns (TPI-LLM)
- pp.py         pipeline parallel: one worker's stage of layers; requests in micro-batches
- requests.py   several requests: prompts, Poisson arrivals, routing, per-request figures
- window.py     sliding-window weight streaming from disk (--memory-budget; TPI-LLM)
- splitwise.py  prefill and decode pools, KV cache shipped layer by layer; colocated baseline
- lamina.py     decode-time attention on memory workers that hold the KV cache (Lamina)
- worker.py     what each worker runs; generate(cfg) starts them (lowband.launch.local)
- http.py       `lowband serve`: POST /v1/completions (SSE streaming), /health, /metrics
- cli.py        `lowband generate` and `lowband serve`
"""

from lowband.serve.config import GenerateConfig, validate_generate
from lowband.serve.sampling import Sampler, top_p_filter
from lowband.serve.worker import generate

__all__ = ["GenerateConfig", "Sampler", "generate", "top_p_filter", "validate_generate"]
