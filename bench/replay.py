"""Replay throughput: cases per second for a 10,000-case replay through the current, a
candidate and a previous config and the baselines (always-lite, always-deep, rules-only).

    python bench/replay.py [--cases 10000]

Cases are the lite-deep eval set's, repeated under new ids with a case number appended
(so no two texts are the same and nothing is encoded twice by accident). The baseline,
measured in the same run: the bare encoder on the same texts in the same batches, once
(configs that share an encoder share each batch's vectors), which is the floor of what a
replay must spend. Prints the replay's cases/s, the encoder's texts/s and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from routemesh.services.replay_worker.cases import load_input, sample
from routemesh.services.replay_worker.receipt import finish
from routemesh.services.replay_worker.replay import load_configs, open_routers, replay

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def variants(work: Path) -> tuple[Path, Path]:
    text = (EXAMPLES / "lite-deep.yaml").read_text()
    deep = text.index("id: deep")
    paths = []
    for name, threshold in (("candidate", "0.95"), ("previous", "0.50")):
        path = work / f"{name}.yaml"
        path.write_text(text[:deep] + text[deep:].replace("threshold: 0.60",
                                                          f"threshold: {threshold}", 1))
        paths.append(path)
    return paths[0], paths[1]


def dataset(work: Path, cases: int) -> Path:
    rows = [json.loads(line) for line in (EXAMPLES / "lite-deep.eval.jsonl")
            .read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "prompt" in r]
    path = work / "big.eval.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"case-{i:05d}", "route": rows[i % len(rows)]["route"],
                    "prompt": f"{rows[i % len(rows)]['prompt']} ({i})"}) + "\n"
        for i in range(cases)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="routemesh-bench-replay-"))
    shutil.copytree(EXAMPLES / "lite-deep", work / "lite-deep")
    shutil.copy(EXAMPLES / "lite-deep.yaml", work)
    candidate, previous = variants(work)
    path = dataset(work, args.cases)
    configs = load_configs(work / "lite-deep.yaml", candidate, previous)
    started = time.perf_counter()
    routers = open_routers(configs)
    opened = time.perf_counter() - started
    read, files_sha256 = load_input("dataset", path)
    cases = sample(read, 0)

    encoder = routers["current"].encoder.inner
    texts = [c.request.match_text(routers["current"].config.semantic.match_text)
             for c in cases]
    started = time.perf_counter()
    for start in range(0, len(texts), 64):
        encoder.encode(texts[start : start + 64])
    encode_s = time.perf_counter() - started

    started = time.perf_counter()
    result = replay(configs, cases, source="dataset", input_name=path.name,
                    input_files_sha256=files_sha256, cases_read=len(read), limit=0,
                    routers=routers)
    replay_s = time.perf_counter() - started
    started = time.perf_counter()
    report = finish(result, None)
    receipt_s = time.perf_counter() - started

    systems = [s.name for s in report.systems]
    print(f"{len(cases)} cases, {len(systems)} systems ({', '.join(systems)}); "
          f"{len(routers)} config systems share one encoder; routers opened in {opened:.1f} s")
    print(f"replay: {replay_s:.1f} s, {len(cases) / replay_s:.0f} cases/s "
          f"({len(cases) * len(routers) / replay_s:.0f} config decisions/s)")
    print(f"baseline, the bare encoder on the same texts: {encode_s:.1f} s, "
          f"{len(cases) / encode_s:.0f} texts/s")
    print(f"ratio replay / encoder-only: {encode_s / replay_s:.2f}; receipt and drift "
          f"{receipt_s:.2f} s")
    accuracy = {s.name: round(s.accuracy, 3) for s in report.systems if s.accuracy is not None}
    print(f"accuracy: {accuracy}")


if __name__ == "__main__":
    main()
