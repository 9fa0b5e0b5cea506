"""Hugging Face transformers `generate` with whole-request batching, the seeds' llm_model design:
a batch of B prompts starts together and runs to its last token (forced here: min = max new
tokens, so every request yields exactly --new-tokens). Random weights of Qwen2.5-0.5B's shape in
bf16, so it compares with batchtune's synthetic:qwen2.5-0.5b on the same GPU.

Prints one JSON object per batch size: output tokens/s and the time of one batch."""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="1,8,32,64")
ap.add_argument("--prompt-tokens", type=int, default=46)
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--repeats", type=int, default=3)
a = ap.parse_args()

cfg = Qwen2Config(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
for b in [int(x) for x in a.sizes.split(",")]:
    ids = torch.randint(16, 150000, (b, a.prompt_tokens), device="cuda")
    mask = torch.ones_like(ids)
    times = []
    for r in range(a.repeats + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                           min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        if r > 0:  # the first run compiles and allocates
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({"batch_size": b, "new_tokens": a.new_tokens, "batch_s": med,
                      "tokens_per_s": b * a.new_tokens / med}), flush=True)
