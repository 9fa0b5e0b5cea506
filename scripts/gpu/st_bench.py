"""sentence-transformers `encode` throughput at fixed batch sizes (the Python baseline).

Usage: python3 st_bench.py --model DIR --dtype fp32|fp16 --sizes 1,8,32 --seconds 2 [--words 24 | --texts-file F]
Prints one JSON object per batch size, like `runtime bench`. With --texts-file (written by
`runtime bench --texts loadgen --dump-texts F`) both stacks embed the same mixed-length inputs, and
successive batches take successive windows of them, as `runtime bench` does.
"""
import argparse, json, time
import torch
from sentence_transformers import SentenceTransformer
from texts import fixed_texts

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
ap.add_argument("--sizes", default="1,8,32,64,128,256")
ap.add_argument("--seconds", type=float, default=2.0)
ap.add_argument("--words", type=int, default=24)
ap.add_argument("--texts-file")
a = ap.parse_args()

m = SentenceTransformer(a.model, device="cuda")
# The carried weights are f16; set the precision under test explicitly.
m = m.half() if a.dtype == "fp16" else m.float()
texts = open(a.texts_file).read().splitlines() if a.texts_file else fixed_texts(256, a.words)
ntok = [len(ids) for ids in m.tokenizer(texts)["input_ids"]]
nxt = 0


def take(b):
    global nxt
    idx = [(nxt + i) % len(texts) for i in range(b)]
    nxt = (nxt + b) % len(texts)
    return [texts[i] for i in idx], sum(ntok[i] for i in idx)


for b in [int(x) for x in a.sizes.split(",")]:
    for _ in range(2):
        batch, _ = take(b)
        m.encode(batch, batch_size=b, convert_to_numpy=True, normalize_embeddings=True)
    torch.cuda.synchronize()
    times, tokens, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds or len(times) < 3:
        batch, n = take(b)
        tokens += n
        t = time.perf_counter()
        m.encode(batch, batch_size=b, convert_to_numpy=True, normalize_embeddings=True)  # returns host arrays: synchronised
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    times.sort()
    print(json.dumps({"batch_size": b, "tokens_per_input": tokens / (len(times) * b), "forwards": len(times), "inputs_per_s": len(times) * b / total,
                      "tokens_per_s": tokens / total, "median_forward_s": times[len(times) // 2], "dtype": a.dtype}), flush=True)
