"""`routemesh route`, `routemesh bank build` and `routemesh eval`."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from aiokafka.errors import KafkaError
from qdrant_client import QdrantClient
from rich.console import Console
from rich.progress import track
from rich.table import Table

from routemesh.contracts import RouteBankPublished
from routemesh.services.cli.output import err, fail
from routemesh.services.replay_worker.cases import from_items, input_set_sha256
from routemesh.services.replay_worker.receipt import eval_receipt, read_receipt
from routemesh.services.router import (
    ConfigError,
    DatasetError,
    LoadedConfig,
    RouteRequest,
    StaleBankError,
    UnknownRouteError,
    build_dense_encoder,
    build_route_bank,
    compare,
    evaluate,
    file_sha256,
    load_config,
    load_dataset,
    load_router,
    open_qdrant,
    unrouted_warning,
    write_reports,
)
from routemesh.services.router.bank import announcement
from routemesh.services.router.encoders import (
    LOCAL_MODEL_NAME,
    EncoderError,
    default_model_dir,
    export_model,
)
from routemesh.services.runtime.files import files_sha256, pretty_json, write_atomically
from routemesh.services.runtime.kafka import (
    EventProducer,
    event_address,
    without_refused_idempotence,
)
from routemesh.services.runtime.settings import ServiceSettings

bank_app = typer.Typer(help="The route bank in Qdrant.", no_args_is_help=True)
encoder_app = typer.Typer(help="The local encoder's model files.", no_args_is_help=True)

ConfigOption = Annotated[Path, typer.Option("--config", help="Route config (YAML).")]
QdrantUrl = Annotated[str | None, typer.Option(help="Qdrant server URL.")]
QdrantPath = Annotated[Path | None, typer.Option(help="Qdrant local-mode directory.")]


def _qdrant(url: str | None, path: Path | None) -> QdrantClient | None:
    """The Qdrant the options or the settings name; None when neither names one."""
    settings = ServiceSettings()
    url = url or settings.qdrant_url
    path = path or settings.qdrant_path
    if not url and not path:
        return None
    key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    return open_qdrant(url, path, key)


def qdrant_or_local(url: str | None, path: Path | None) -> QdrantClient:
    """As ``_qdrant``, else where every service looks when nothing is named
    (``ServiceSettings.qdrant_location``)."""
    settings = ServiceSettings()
    key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    return _qdrant(url, path) or open_qdrant(*settings.qdrant_location(), key)


def route(
    text: Annotated[str, typer.Argument(help="The prompt to route.")],
    config: ConfigOption,
    model: Annotated[str, typer.Option(help="The requested model.")] = "auto",
    qdrant_url: QdrantUrl = None,
    qdrant_path: QdrantPath = None,
) -> None:
    """Print the decision for one prompt as JSON (the bank is built in memory unless a
    Qdrant location is given)."""
    try:
        router = load_router(config, qdrant=_qdrant(qdrant_url, qdrant_path))
        decision = router.decide(RouteRequest.from_text(text, model), str(uuid.uuid4()))
    except (ConfigError, StaleBankError, LookupError, UnknownRouteError) as exc:
        raise fail(str(exc)) from None
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(decision)).decode() + "\n")


@bank_app.command("build")
def bank_build(
    config: ConfigOption,
    qdrant_url: QdrantUrl = None,
    qdrant_path: QdrantPath = None,
    collection: Annotated[str | None, typer.Option(help="Collection name.")] = None,
    announce: Annotated[bool, typer.Option(
        help="Then publish a RouteBankPublished on routebank.changes (ROUTEMESH_KAFKA_* "
             "settings), so that running gateways load the bank.")] = False,
    train: Annotated[Path | None, typer.Option(
        help="Labelled JSONL (the eval format) that trains the route model too (never the "
             "bank's nearest-utterance evidence); eval then leaves these items out.",
        exists=True, dir_okay=False)] = None,
) -> None:
    """Embed every utterance into Qdrant and fit the route model; an unchanged bank
    re-embeds nothing."""
    try:
        loaded = load_config(config)
        client = qdrant_or_local(qdrant_url, qdrant_path)
        report = build_route_bank(loaded, client, collection, train)
    except (ConfigError, DatasetError) as exc:
        raise fail(str(exc)) from None
    model = report.model
    print(
        f"collection {report.collection}: embedded {report.embedded}, kept {report.kept}, "
        f"removed {report.removed}; route_bank_sha256 {report.sha256}"
    )
    validation = model.validation
    held_out = (f"; held-out accuracy {validation.accuracy:.3f}, calibration error "
                f"{validation.expected_calibration_error:.3f} ({validation.folds} folds of "
                f"{validation.groups} paraphrase groups)" if validation else "")
    print(f"route model: {model.scoring}, temperature {model.temperature:.3f}, evidence "
          f"floor {model.evidence_floor:.3f}{held_out}"
          + (f"; trained on {len(model.train_text_sha256)} extra prompts"
             if model.train_text_sha256 else ""))
    if announce:
        announce_bank(loaded, report.collection, report.sha256, report.encoder,
                      report.embedded + report.kept)


def announce_bank(loaded: LoadedConfig, collection: str, sha256: str, encoder: str,
                  utterances: int) -> None:
    """Publish a RouteBankPublished on routebank.changes (ROUTEMESH_KAFKA_* settings), so
    that running gateways load the bank."""
    event = announcement(loaded, collection, sha256, encoder, utterances)
    try:
        topic = asyncio.run(_announce(event))
    except (KafkaError, OSError) as exc:
        raise fail(f"the bank is written, but announcing it failed: {exc}") from None
    print(f"announced on {topic}")


async def _announce(event: RouteBankPublished) -> str:
    settings = await without_refused_idempotence(ServiceSettings())
    producer = EventProducer(settings, "cli")
    try:
        await producer.start()
        await producer.publish(event)
    finally:
        await producer.stop()
    return event_address(settings, event)[0]


def eval_command(
    config: ConfigOption,
    dataset: Annotated[Path, typer.Option(help="Labelled JSONL: id, prompt|messages, route.")],
    out: Annotated[Path, typer.Option(help="Directory for report.json and report.md.")],
    backend: Annotated[
        str | None, typer.Option(help="memory or qdrant (default: the config's).")
    ] = None,
    qdrant_url: QdrantUrl = None,
    qdrant_path: QdrantPath = None,
    strict: Annotated[bool, typer.Option(
        help="Exit non-zero when more than 5 % of the items were decided by an override "
             "or passthrough instead of routing.")] = False,
    compare_scorings: Annotated[bool, typer.Option(
        "--compare", help="Instead: run the dataset with each scoring (the logistic head "
        "and each aggregation) and print one table.")] = False,
) -> None:
    """Run a labelled set through the config and the baselines; write reports."""
    if compare_scorings:
        _compare(config, dataset)
        return
    try:
        router = load_router(
            config, qdrant=_qdrant(qdrant_url, qdrant_path), backend=backend
        )
        items = load_dataset(dataset)
        report = evaluate(
            router, items, file_sha256(dataset),
            progress=lambda it: track(it, description="routing", console=err),
        )
    except (ConfigError, StaleBankError, LookupError, DatasetError) as exc:
        raise fail(str(exc)) from None
    if report.excluded_trained:
        err.print(f"[bold yellow]note:[/bold yellow] {report.excluded_trained} items left "
                  "out: the route model was trained on them (bank build --train)",
                  highlight=False)
    json_path, md_path = write_reports(report, out)
    receipt_path = out / "report.receipt.json"
    receipt = eval_receipt(report, files_sha256(router.loaded.files),
                           input_set_sha256(from_items(items)), read_receipt(receipt_path))
    outputs = {p.name: file_sha256(p) for p in (json_path, md_path)}
    write_atomically(receipt_path, pretty_json(msgspec.structs.replace(receipt,
                                                                       outputs=outputs)))
    table = Table(title=f"{dataset.name}: {report.items} items")
    table.add_column("system")
    table.add_column("accuracy", justify="right")
    table.add_row("routemesh", f"{report.accuracy:.3f}")
    for name, baseline in report.baselines.items():
        table.add_row(name, f"{baseline.accuracy:.3f}")
    Console().print(table)
    latency = report.latency_ms
    print(f"decision latency ms p50 {latency.p50:.2f} p95 {latency.p95:.2f} "
          f"p99 {latency.p99:.2f}")
    if report.calibration_error is not None:
        print(f"calibration error (semantic layer) {report.calibration_error:.3f}")
    print(f"wrote {json_path}, {md_path} and {receipt_path} (run hash {receipt.run_hash})")
    if receipt.deterministic_violation:
        err.print("[red]deterministic_violation:[/red] the earlier run in this directory had "
                  "the same code and inputs and another run hash", highlight=False)
    warning = unrouted_warning(report)
    if warning is not None:
        if strict:
            raise fail(warning)
        err.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)


def _compare(config: Path, dataset: Path) -> None:
    try:
        loaded = load_config(config)
        items = load_dataset(dataset)
        encoder = build_dense_encoder(loaded.config.encoder)
        reports = compare(loaded, encoder, items, file_sha256(dataset))
    except (ConfigError, DatasetError) as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{dataset.name}: {len(items)} items, each scoring")
    for column in ("scoring", "accuracy", "macro-F1", "calibration error", "p50 ms"):
        table.add_column(column, justify="left" if column == "scoring" else "right")
    for name, report in reports:
        table.add_row(name, f"{report.accuracy:.3f}", f"{report.macro_f1:.3f}",
                      f"{report.calibration_error:.3f}" if report.calibration_error is not None
                      else "-", f"{report.latency_ms.p50:.2f}")
    Console().print(table)


@encoder_app.command("export")
def encoder_export(
    model_dir: Annotated[Path | None, typer.Option(
        help="Where to write the model (default: ROUTEMESH_MODEL_DIR, else "
             "~/.cache/routemesh/models).")] = None,
    int8: Annotated[bool, typer.Option(help="Also quantise the int8 copy.")] = True,
) -> None:
    """Export the packaged MiniLM to ONNX (and its int8 copy): what serving reads, so
    that serving needs no torch. Needs the export extra (torch, sentence-transformers)."""
    try:
        exported = export_model(model_dir or default_model_dir(), int8=int8)
    except EncoderError as exc:
        raise fail(str(exc)) from None
    print(f"exported {LOCAL_MODEL_NAME} to {exported}")
