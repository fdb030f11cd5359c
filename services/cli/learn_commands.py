"""`routemesh learn` and `learn rollback`: the route model learns from reviewed traffic
(outcomes naming the expected route, joined with review captures) behind the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from routemesh.services.cli.output import Strict, err, fail, report_skipped
from routemesh.services.cli.router_commands import (
    ConfigOption,
    QdrantPath,
    QdrantUrl,
    announce_bank,
    qdrant_or_local,
)
from routemesh.services.replay_worker import learn as learning
from routemesh.services.router import (
    ConfigError,
    DatasetError,
    StaleBankError,
    load_config,
)
from routemesh.services.router.bank import (
    default_collection,
    load_snapshot,
    route_bank_sha256,
    store_model,
)
from routemesh.services.router.scoring import RouteModel
from routemesh.services.runtime.files import Skipped

learn_app = typer.Typer(help="The route model learns from reviewed traffic, behind the "
                             "gate.")


def _print(receipt: learning.LearnReceipt) -> None:
    table = Table(title="reviewed outcomes per route")
    columns = ("route", "utterances", "labelled", "with text", "quarantined", "capped",
               "contradicting", "learned", "already learned")
    for column in columns:
        table.add_column(column, justify="left" if column == "route" else "right")
    for route, c in receipt.routes.items():
        table.add_row(route, *(str(n) for n in (
            c.utterances, c.labelled, c.with_text, c.quarantined, c.capped,
            c.contradicting, c.learned, c.already_learned)))
    # Wide enough for every column in a log (rich would squeeze them to 80).
    Console(width=max(120, Console().width)).print(table)
    for refusal in receipt.refused:
        err.print(f"left out {refusal.request_id} ({refusal.route}): {refusal.reason}",
                  highlight=False)
    for name, f in (("held-back reviewed items", receipt.held_back),
                    ("eval set", receipt.eval)):
        if f is not None:
            print(f"{name} ({f.items}): serving {f.current:.3f}, learned {f.candidate:.3f}")
    if receipt.curve:
        print("learning curve (share of the batch learned -> held-back accuracy): "
              + ", ".join(f"{share:.2f} -> {acc:.3f}" for share, acc in receipt.curve))
    if receipt.held_back is not None:
        gain = receipt.held_back.candidate - receipt.held_back.current
        rising = len(receipt.curve) > 1 and receipt.curve[-1][1] > receipt.curve[-2][1]
        print(f"expected gain on reviewed traffic like this: {gain:+.3f}"
              + ("; still rising with more reviews" if rising else ""))


@learn_app.callback(invoke_without_command=True)
def learn(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(exists=True, help="The live route config.")
                      ] = None,
    audit_dir: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="Audit files: outcomes naming expected_route."
    )] = None,
    captures: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False,
        help="Review captures (raw_local, or redacted as JSON lines): the only text "
             "learned from.")] = None,
    eval_set: Annotated[Path | None, typer.Option(
        "--eval", exists=True, dir_okay=False,
        help="The eval set the gate also scores (default: NAME.eval.jsonl beside the "
             "config, when there is one).")] = None,
    out: Annotated[Path, typer.Option(help="Where the receipt (and the replaced model) go.")
                   ] = Path(".routemesh/learn"),
    plan: Annotated[bool, typer.Option(
        help="Only report: what is waiting per route, the gate's figures and the learning "
             "curve; write nothing.")] = False,
    announce: Annotated[bool, typer.Option(
        help="When the gate passes, announce the bank on routebank.changes so that running "
             "gateways load it.")] = False,
    qdrant_url: QdrantUrl = None,
    qdrant_path: QdrantPath = None,
    cap_per_utterance: Annotated[float, typer.Option(
        min=0, help="A route learns at most this many items per utterance it has.")
    ] = learning.LearnPolicy.cap_per_utterance,
    max_contradiction_rate: Annotated[float, typer.Option(
        min=0, max=1, help="Refuse a batch when more of its labels than this share "
                           "contradict the bank's own utterances.")
    ] = learning.LearnPolicy.max_contradiction_rate,
    tolerance: Annotated[float, typer.Option(
        min=0, help="How much accuracy the learned model may lose against the serving one.")
    ] = learning.LearnPolicy.tolerance,
    strict: Strict = False,
) -> None:
    """Learn the route model from outcomes that name an expected route and the review
    captures of the same requests; write the bank only when the gate passes."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None or audit_dir is None or captures is None:
        raise fail("give --config, --audit-dir and --captures", 2)
    policy = learning.LearnPolicy(cap_per_utterance=cap_per_utterance,
                                  max_contradiction_rate=max_contradiction_rate,
                                  tolerance=tolerance)
    skipped = Skipped()
    try:
        done = learning.run(config, qdrant_or_local(qdrant_url, qdrant_path), audit_dir,
                            captures, eval_set, out, policy, plan=plan, skipped=skipped,
                            progress=lambda step: err.print(step, highlight=False))
    except (ConfigError, StaleBankError, LookupError, DatasetError) as exc:
        raise fail(str(exc)) from None
    receipt = done.receipt
    _print(receipt)
    report_skipped(skipped.by_file(), strict)
    if plan:
        print("plan only: nothing written")
        return
    print(f"receipt {done.receipt_path}")
    if receipt.unchanged:
        print(receipt.reasons[0])
        return
    if not receipt.written:
        raise fail("learn: " + "; ".join(receipt.reasons))
    print(f"gate passed: wrote route bank {receipt.route_bank_sha256_after} to "
          f"{done.collection}")
    print(receipt.rollback)
    if announce:
        assert receipt.route_bank_sha256_after is not None
        announce_bank(done.loaded, done.collection, receipt.route_bank_sha256_after,
                      done.encoder, done.utterances)
        done.announced()


@learn_app.command("rollback")
def rollback(
    config: ConfigOption,
    receipt_path: Annotated[Path, typer.Option(
        "--receipt", exists=True, dir_okay=False, help="The receipt of the learn to undo.")],
    announce: Annotated[bool, typer.Option(help="Then announce the restored bank.")
                        ] = False,
    qdrant_url: QdrantUrl = None,
    qdrant_path: QdrantPath = None,
) -> None:
    """Serve the route model a learn replaced again."""
    try:
        receipt = msgspec.json.decode(receipt_path.read_bytes(), type=learning.LearnReceipt)
        previous = msgspec.json.decode((receipt_path.parent / learning.PREVIOUS_MODEL).read_bytes(),
                                       type=RouteModel)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise fail(f"{receipt_path}: not a learn receipt with its replaced model ({exc})"
                   ) from None
    try:
        loaded = load_config(config)
        client = qdrant_or_local(qdrant_url, qdrant_path)
        collection = default_collection(loaded)
        bank = load_snapshot(client, collection, loaded.config.semantic)
    except (ConfigError, LookupError) as exc:
        raise fail(str(exc)) from None
    restored = route_bank_sha256(bank.utterances_sha256, previous)
    if restored != receipt.route_bank_sha256_before:
        raise fail("the bank's utterances changed since this learn: rebuild it with "
                   "`routemesh bank build` instead")
    if bank.sha256 != receipt.route_bank_sha256_after:
        raise fail(f"the serving bank ({bank.sha256[:12]}) is not the one this learn wrote "
                   f"({(receipt.route_bank_sha256_after or '-')[:12]}): a later change "
                   "would be undone too; roll that back first")
    store_model(client, collection, previous)
    print(f"restored route bank {restored} in {collection}")
    if announce:
        announce_bank(loaded, collection, restored, bank.encoder_name, len(bank))
