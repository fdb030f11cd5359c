"""The semantic-router side of bench/peer_semantic_router.py.

Runs inside the peer virtual environment (semantic-router pins its own dependencies,
so it never shares the project's). Reads a JSON job on stdin, prints JSON results.
"""

import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"

from semantic_router import IndexedRouter, Route
from semantic_router.encoders import LocalEncoder


def main() -> None:
    job = json.load(sys.stdin)
    encoder = LocalEncoder(name=job["model_path"], device="cpu")
    routes = [Route(name=r["name"], utterances=r["utterances"]) for r in job["routes"]]
    router = IndexedRouter(encoder=encoder, routes=routes)
    for query in job["queries"][:10]:
        router(query)
    predictions, latencies = [], []
    for query in job["queries"]:
        started = time.perf_counter()
        choice = router(query)
        latencies.append((time.perf_counter() - started) * 1000)
        predictions.append(choice.name)
    import semantic_router

    json.dump({"version": semantic_router.__version__, "predictions": predictions,
               "latencies_ms": latencies}, sys.stdout)


if __name__ == "__main__":
    main()
