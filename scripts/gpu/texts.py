"""The same fixed-length texts as `runtime::bench::fixed_texts`, so both stacks embed identical inputs."""

W = ["the", "model", "serves", "requests", "with", "dynamic", "batching", "under", "load", "quickly"]


def fixed_texts(n, words):
    return [" ".join(W[(i + j * 7) % len(W)] for j in range(words)) for i in range(n)]
