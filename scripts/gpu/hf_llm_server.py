"""The seeds' llm_model server design over Hugging Face transformers (the baseline batchtune's
generation is compared with on the same GPU): requests queue; MAX_CONCURRENT_GENERATIONS workers
each take up to MAX_INFERENCE_BATCH_SIZE of them, waiting at most BATCH_WAIT_TIMEOUT seconds for
the batch to fill, and run one `generate` for the whole batch (left-padded prompts, as many new
tokens as the batch's longest request; each request then gets its own max_tokens). A batch takes
no newcomers until its longest request ends: whole-request batching. A full queue
(MAX_INFERENCE_QUEUE_SIZE) answers 429.

Random weights of Qwen2.5-0.5B's shape in bf16 (batchtune's synthetic:qwen2.5-0.5b). There is no
tokenizer offline: a prompt's words become ids by hashing (one id per word, as batchtune's
built-in tokenizer gives about one per word), and the answer's text is its ids.

OpenAI-compatible POST /v1/completions (non-streaming: `usage.completion_tokens`), GET /health.
With `ignore_eos` (loadgen --ignore-eos) every request gets exactly its max_tokens.

Usage: MAX_CONCURRENT_GENERATIONS=4 MAX_INFERENCE_BATCH_SIZE=4 BATCH_WAIT_TIMEOUT=0.05 \\
       python3 hf_llm_server.py --port 9500
"""
import argparse, asyncio, os, time, zlib
from concurrent.futures import ThreadPoolExecutor

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, Qwen2Config

WORKERS = int(os.environ.get("MAX_CONCURRENT_GENERATIONS", 4))
BATCH = int(os.environ.get("MAX_INFERENCE_BATCH_SIZE", 4))
WAIT = float(os.environ.get("BATCH_WAIT_TIMEOUT", 0.05))
QUEUE = int(os.environ.get("MAX_INFERENCE_QUEUE_SIZE", 500))
MAX_NEW = int(os.environ.get("MAX_NEW_TOKENS", 128))
VOCAB = 151936


def ids_of(prompt):
    return [16 + zlib.crc32(w.encode()) % (VOCAB - 16) for w in prompt.split()] or [16]


def run_batch(model, items):
    n = max(len(i["ids"]) for i in items)
    ids = torch.zeros((len(items), n), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(items):
        ids[r, n - len(i["ids"]):] = torch.tensor(i["ids"])
        mask[r, n - len(i["ids"]):] = 1
    new = max(i["max_tokens"] for i in items)
    forced = all(i["ignore_eos"] for i in items)
    # One generate call has one temperature: the batch's first request's (OpenAI's default 1).
    t = items[0]["temperature"]
    sampling = dict(do_sample=True, temperature=t, top_p=1.0, top_k=0) if t > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new,
                             min_new_tokens=new if forced else 0, pad_token_id=0, **sampling)
    return [out[r, n:n + i["max_tokens"]].tolist() for r, i in enumerate(items)]


async def worker(queue, model, pool):
    loop = asyncio.get_running_loop()
    while True:
        items = [await queue.get()]
        deadline = loop.time() + WAIT
        while len(items) < BATCH:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        try:
            outs = await loop.run_in_executor(pool, run_batch, model, items)
            for i, o in zip(items, outs):
                if not i["fut"].done():
                    i["fut"].set_result(o)
        except Exception as e:  # the whole batch fails together, as in the seeds' server
            for i in items:
                if not i["fut"].done():
                    i["fut"].set_exception(e)


async def completions(request):
    body = await request.json()
    q = request.app["queue"]
    if q.qsize() >= QUEUE:
        return web.json_response({"error": {"message": "queue full"}}, status=429)
    item = {"ids": ids_of(str(body.get("prompt", ""))),
            "max_tokens": min(int(body.get("max_tokens", MAX_NEW)), MAX_NEW),
            "ignore_eos": bool(body.get("ignore_eos", False)),
            "temperature": float(body.get("temperature", 1.0)),
            "fut": asyncio.get_running_loop().create_future()}
    await q.put(item)
    out = await item["fut"]
    return web.json_response({
        "object": "text_completion", "created": int(time.time()), "model": "hf-qwen2.5-0.5b",
        "choices": [{"index": 0, "text": " ".join(map(str, out)), "finish_reason": "length"}],
        "usage": {"prompt_tokens": len(item["ids"]), "completion_tokens": len(out),
                  "total_tokens": len(item["ids"]) + len(out)}})


async def health(_):
    return web.json_response({"status": "ok"})


async def start(app):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    run_batch(model, [{"ids": [16] * 8, "max_tokens": 4, "ignore_eos": True, "temperature": 1.0}])  # warm-up
    app["queue"] = asyncio.Queue()
    pool = ThreadPoolExecutor(WORKERS)
    app["workers"] = [asyncio.create_task(worker(app["queue"], model, pool))
                      for _ in range(WORKERS)]


ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=9500)
a = ap.parse_args()
app = web.Application()
app.router.add_post("/v1/completions", completions)
app.router.add_get("/health", health)
app.on_startup.append(start)
web.run_app(app, host="127.0.0.1", port=a.port, print=None)
