"""A replay as the CLI and the worker run it: read the input, sample it, replay it,
add the receipt and the drift section, write the report files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from routemesh.services.replay_worker.cases import Case, load_input, sample
from routemesh.services.replay_worker.receipt import Bands, Report, finish, write_outputs
from routemesh.services.replay_worker.render import render_markdown
from routemesh.services.replay_worker.replay import (
    Configs,
    ReplayError,
    Source,
    load_configs,
    open_routers,
    replay,
)
from routemesh.services.router import ConfigError, DatasetError
from routemesh.services.runtime.files import Skipped


@dataclass(frozen=True)
class ReplaySpec:
    config: Path
    source: Source
    input: Path
    candidate: Path | None = None
    previous: Path | None = None
    audit_dir: Path | None = None
    since: datetime | None = None
    limit: int = 100
    allow_remote_embeddings: bool = False


@dataclass(frozen=True)
class Outcome:
    report: Report
    markdown: str
    receipt: Path | None
    configs: Configs
    cases: list[Case]


def run(spec: ReplaySpec, *, history: Path | None = None, json_output: Path | None = None,
        markdown_output: Path | None = None, bands: Bands | None = None,
        progress: Callable[[int, int], None] = lambda done, total: None) -> Outcome:
    """Raises ReplayError (a ConfigError or DatasetError too) with a readable message."""
    skipped = Skipped()
    try:
        configs = load_configs(spec.config, spec.candidate, spec.previous)
        read, files_sha256 = load_input(spec.source, spec.input, audit_dir=spec.audit_dir,
                                        since=spec.since, skipped=skipped)
    except (ConfigError, DatasetError, OSError) as exc:
        raise ReplayError(str(exc)) from None
    labels = {c.label for c in read if c.label is not None}
    routes = {r.id for _, loaded in configs.named() for r in loaded.config.routes}
    unknown = sorted(labels - routes)
    if unknown:
        raise ReplayError(f"{spec.input.name}: labels that are no route of the configs: "
                          f"{unknown}")
    cases = sample(read, spec.limit)
    routers = open_routers(configs, spec.allow_remote_embeddings)
    total = sum(c.request is not None for c in cases) * len(routers)
    done = 0

    def step(count: int) -> None:
        nonlocal done
        done += count
        progress(done, total)

    result = replay(configs, cases, source=spec.source, input_name=spec.input.name,
                    input_files_sha256=files_sha256, cases_read=len(read),
                    limit=spec.limit, skipped_lines=skipped.by_file(), routers=routers,
                    progress=step)
    report = finish(result, history, bands)
    markdown = render_markdown(report)
    receipt = write_outputs(report, json_output, markdown_output, markdown)
    return Outcome(report, markdown, receipt, configs, cases)
