"""A minimal Python asyncio dynamic batcher mirroring seed 004's design (the baseline server).

Requests are queued; MAX_CONCURRENT_BATCHES workers each take up to BATCH_SIZE items, waiting at
most BATCH_WAIT_TIME_MS for the batch to fill, and run sentence-transformers' encode in a thread
pool; a full queue (MAX_QUEUE_SIZE) answers 429 (QUEUE_OVERFLOW_ACTION=reject). OpenAI-compatible
POST /v1/embeddings and GET /health, served by aiohttp.

Usage: BATCH_SIZE=64 BATCH_WAIT_TIME_MS=5 MAX_CONCURRENT_BATCHES=2 \
       python3 py_batcher_server.py --model DIR --port 8300 [--fp16]
"""
import argparse, asyncio, os, time
from concurrent.futures import ThreadPoolExecutor
from aiohttp import web
from sentence_transformers import SentenceTransformer

BATCH_SIZE = int(os.environ.get("BATCH_SIZE", 8))
BATCH_WAIT = int(os.environ.get("BATCH_WAIT_TIME_MS", 50)) / 1000.0
WORKERS = int(os.environ.get("MAX_CONCURRENT_BATCHES", 2))
MAX_QUEUE = int(os.environ.get("MAX_QUEUE_SIZE", 1000))


async def batch_worker(queue, model, pool):
    loop = asyncio.get_running_loop()
    while True:
        first = await queue.get()
        items = [first]
        deadline = loop.time() + BATCH_WAIT
        while len(items) < BATCH_SIZE:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        texts = [t for t, _ in items]
        try:
            vecs = await loop.run_in_executor(pool, lambda: model.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True))
            for (_, fut), v in zip(items, vecs):
                if not fut.done():
                    fut.set_result(v.tolist())
        except Exception as e:  # a failed batch fails its own requests only
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(e)


async def embeddings(request):
    body = await request.json()
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not texts or not all(isinstance(t, str) and t for t in texts):
        return web.json_response({"error": {"message": "input must be a string or an array of strings"}}, status=400)
    q = request.app["queue"]
    if q.qsize() + len(texts) > MAX_QUEUE:
        return web.json_response({"error": {"message": "queue full"}}, status=429)
    loop = asyncio.get_running_loop()
    futs = []
    for t in texts:
        f = loop.create_future()
        q.put_nowait((t, f))
        futs.append(f)
    vecs = await asyncio.gather(*futs)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
    return web.json_response({"object": "list", "data": data, "model": "all-MiniLM-L6-v2"})


async def health(request):
    return web.json_response({"status": "ready"})


async def start(app):
    app["queue"] = asyncio.Queue()
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    app["workers"] = [asyncio.create_task(batch_worker(app["queue"], app["model"], pool)) for _ in range(WORKERS)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--fp16", action="store_true")
    a = ap.parse_args()
    model = SentenceTransformer(a.model, device="cuda")
    model = model.half() if a.fp16 else model.float()
    model.encode(["warm up"])
    app = web.Application()
    app["model"] = model
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/health", health)
    app.on_startup.append(start)
    print(f"listening on http://127.0.0.1:{a.port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
