"""What `routemesh learn` buys, measured on prompts it did not learn from.

    python bench/learn.py [--splits 3] [--per-route 3 5]

For both shipped configs, with the real MiniLM encoder: N reviewed prompts per route are
drawn from the eval set (a different random draw per split), learned through the product's
own path (guards, fit and gate, as `routemesh learn` runs them), and the serving and the
learned model are both scored on the rest of the eval set. The eval sets were written next
to the utterances and flatter every model alike; what this shows is the step learning adds
and what the gate says of it. Also printed: the wall time of one learn.
"""

from __future__ import annotations

import argparse
import random
import time

from qdrant_client import QdrantClient
from routing_cv import EXAMPLES, SETS

from routemesh.services.replay_worker.learn import LearnPolicy, learn
from routemesh.services.router import Router, build_dense_encoder, load_config, load_dataset
from routemesh.services.router.bank import build_bank, load_snapshot
from routemesh.services.router.datasets import EvalItem
from routemesh.services.runtime.captures import Capture


def accuracy(router: Router, items: list[EvalItem]) -> float:
    decided = router.decide_many([(item.request, item.id) for item in items])
    return sum(d.route_id == i.route for d, i in zip(decided, items, strict=True)) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--per-route", type=int, nargs="+", default=[3, 5])
    args = parser.parse_args()
    for config_name, dataset_name in SETS:
        loaded = load_config(EXAMPLES / config_name)
        items = load_dataset(EXAMPLES / dataset_name)
        encoder = build_dense_encoder(loaded.config.encoder)
        client = QdrantClient(":memory:")
        build_bank(loaded, encoder, client, "bench")
        bank = load_snapshot(client, "bench", loaded.config.semantic)
        serving = Router(loaded, bank, encoder)
        print(f"\n{config_name}: {len(items)} eval prompts")
        print(f"{'per route':>10}{'split':>6}{'rest':>6}{'serving':>9}{'learned':>9}"
              f"{'held-back':>18}{'gate':>6}{'learn s':>9}")
        for per_route in args.per_route:
            for split in range(args.splits):
                drawn = list(items)
                random.Random(split).shuffle(drawn)
                chosen = [i for route in sorted({i.route for i in items})
                          for i in [d for d in drawn if d.route == route][:per_route]]
                rest = [i for i in items if i not in chosen]
                started = time.perf_counter()
                learned = learn(serving, bank, {i.id: i.route for i in chosen}, {
                    i.id: Capture(mode="raw_local", chars=i.request.prompt_chars,
                                  truncated=False, text=i.request.match_text("last_user"))
                    for i in chosen}, rest, LearnPolicy())
                took = time.perf_counter() - started
                receipt, after = learned.receipt, serving
                if learned.model is not None:
                    copy = load_snapshot(client, "bench", loaded.config.semantic)
                    copy.use(learned.model)
                    after = Router(loaded, copy, encoder)
                held = receipt.held_back
                print(f"{per_route:>10}{split:>6}{len(rest):>6}"
                      f"{accuracy(serving, rest):>9.3f}{accuracy(after, rest):>9.3f}"
                      + (f"{held.current:>9.3f}->{held.candidate:.3f}" if held else
                         f"{'-':>18}")
                      + f"{'pass' if receipt.passed else 'FAIL':>6}{took:>9.1f}")
                for reason in receipt.reasons:
                    print(f"{'':>16}{reason}")


if __name__ == "__main__":
    main()
