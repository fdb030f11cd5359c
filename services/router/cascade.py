"""The decision cascade: override/passthrough -> rules -> hybrid semantic -> fallback.

Every layer that runs records a LayerAttempt. The result is a ``RouteDecided`` event
that carries hashes and lengths of the prompt, never its text.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from routemesh.contracts import FormatSignals, LayerAttempt, RouteDecided
from routemesh.contracts.events import DecisionLayer, DecisionReason
from routemesh.services.router.bank import Matcher, RouteMatch
from routemesh.services.router.config import LoadedConfig, Route, RuleConfig
from routemesh.services.router.encoders import DenseEncoder, MicroBatcher, SparseEncoder
from routemesh.services.router.request import RouteRequest

PASSTHROUGH_ROUTE = "passthrough"
# The requested model that means "decide": always, unless a config maps it elsewhere.
AUTO_MODEL = "auto"
ANSWER_PIECES = 8


class UnknownRouteError(ValueError):
    """An override named a route the config does not have."""


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


# The semantic layer sees at most this many characters of the match text: its start and
# its end. The dense encoder reads only the first 256 tokens anyway, and tokenising a huge
# prompt whole costs the gateway far more than a normal one (bench/gateway.py).
MATCH_TEXT_MAX_CHARS = 4096


def bounded(text: str) -> tuple[str, bool]:
    """``text``, or its first and last ``MATCH_TEXT_MAX_CHARS / 2`` characters; and
    whether it was cut."""
    if len(text) <= MATCH_TEXT_MAX_CHARS:
        return text, False
    half = MATCH_TEXT_MAX_CHARS // 2
    return f"{text[:half]}\n{text[-half:]}", True


# Of a text of several paragraphs, the semantic layer also ranks this many from its start
# and from its end on their own.
EDGE_PARAGRAPHS = 2
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def segments(text: str) -> list[str]:
    """What the semantic layer ranks of a match text: the text, and when it has several
    paragraphs, its first and last ones on their own. A request that pastes a document
    around its question is otherwise ranked by the document, whose tokens outnumber the
    question's in the pooled vector (the long-prompt check in bench/routing_cv.py)."""
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    if len(paragraphs) < 2:
        return [text]
    edges = (paragraphs if len(paragraphs) <= 2 * EDGE_PARAGRAPHS
             else paragraphs[:EDGE_PARAGRAPHS] + paragraphs[-EDGE_PARAGRAPHS:])
    return [text, *edges]


def most_confident(rankings: list[list[RouteMatch]]) -> list[RouteMatch]:
    """The ranking whose top route is the most probable (the whole text's on a tie)."""
    return max(rankings, key=lambda ranked: ranked[0].score)


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a layer's scores say of a decision: its score and, from the semantic layer,
    the runner-up, the margin between them and the threshold that applied."""

    score: float | None = None
    second: RouteMatch | None = None
    observed_margin: float | None = None
    threshold: float | None = None


NO_EVIDENCE = Evidence()


@dataclass
class _Draft:
    request: RouteRequest
    request_id: str
    started: float
    # The whole match text (what rules read) and what the semantic layer reads of it.
    text: str
    attempts: list[LayerAttempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.semantic_text, self.cut = bounded(self.text)
        self.segments = segments(self.semantic_text)


class Router:
    """Decides routes for one config and one bank. Swap the whole object to reload."""

    def __init__(
        self,
        loaded: LoadedConfig,
        matcher: Matcher | None,
        encoder: DenseEncoder | None,
        *,
        instance: str = "",
    ) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.matcher = matcher
        self.encoder = encoder
        self.instance = instance
        # Concurrent async decisions share encode-and-match calls, run side by side as
        # the encoder allows, each answering its batch piece by piece.
        self._piece = (encoder.batch_hint if encoder is not None else None) or 1
        self.batcher: MicroBatcher[str, list[RouteMatch]] = MicroBatcher(
            self._rank_pieces,
            loaded.config.encoder.batch_size,
            loaded.config.encoder.max_wait_ms,
            encoder.parallel_calls if encoder is not None else 1,
        )
        self._routes = {route.id: route for route in self.config.routes}
        # Requested model -> route (None: decide). ``auto`` is there even when a config
        # lists no aliases: without it every ``auto`` request would pass through upstream
        # as a model named "auto".
        self.aliases: dict[str, str | None] = {AUTO_MODEL: None, **self.config.aliases}
        self._claimed_models = {route.target_model: route.id for route in self.config.routes}
        # Texts being encoded and matched now: a second request for one waits for the
        # first instead of encoding it again.
        self._inflight: dict[str, asyncio.Future[list[RouteMatch]]] = {}
        self._rules = [(rule, _compile(rule)) for rule in self.config.rules]

    # -- public API -------------------------------------------------------------------

    def route(self, route_id: str) -> Route | None:
        """A decided route's config; None for a passthrough."""
        return self._routes.get(route_id)

    @property
    def config_sha256(self) -> str:
        return self.loaded.sha256

    @property
    def route_bank_sha256(self) -> str | None:
        return self.matcher.sha256 if self.matcher is not None else None

    def decide(self, request: RouteRequest, request_id: str) -> RouteDecided:
        (decided,) = self.decide_many([(request, request_id)])
        return decided

    def decide_many(self, requests: Sequence[tuple[RouteRequest, str]],
                    batch: int = 64) -> list[RouteDecided]:
        """``decide`` for each (request, id), encoding the texts that reach the semantic
        layer ``batch`` at a time (replays; the encoder's vectors do not depend on the
        batch a text is in, so each decision is what ``decide`` makes)."""
        decided: list[RouteDecided | None] = []
        waiting: list[tuple[int, _Draft]] = []
        for request, request_id in requests:
            draft, decision = self._before_semantic(request, request_id)
            decided.append(decision)
            if decision is None:
                waiting.append((len(decided) - 1, draft))
        for start in range(0, len(waiting), batch):
            chunk = waiting[start : start + batch]
            started = time.perf_counter()
            try:
                ranked = self._rank_batch([text for _, draft in chunk
                                           for text in draft.segments])
            except Exception as exc:
                for index, draft in chunk:
                    decided[index] = self._embedding_error(draft, exc, started)
                continue
            rankings = iter(ranked)
            for index, draft in chunk:
                mine = [next(rankings) for _ in draft.segments]
                decided[index] = self._semantic(draft, most_confident(mine), started)
        return [d for d in decided if d is not None]

    async def adecide(self, request: RouteRequest, request_id: str) -> RouteDecided:
        """As ``decide``; concurrent callers share one encode-and-match call per batch,
        run in a worker thread."""
        draft, decided = self._before_semantic(request, request_id)
        if decided is not None:
            return decided
        started = time.perf_counter()
        try:
            rankings = await asyncio.gather(*(self._ranked(text) for text in draft.segments))
        except Exception as exc:
            return self._embedding_error(draft, exc, started)
        return self._semantic(draft, most_confident(list(rankings)), started)

    def _ranked(self, text: str) -> asyncio.Future[list[RouteMatch]]:
        """The ranking of ``text``, shared with every caller asking for it meanwhile. A
        future, not a coroutine: gathering a request's texts then starts no task each."""
        pending = self._inflight.get(text)
        if pending is None:
            pending = self._inflight[text] = asyncio.ensure_future(self.batcher.submit(text))
            pending.add_done_callback(functools.partial(self._landed, text))
        # Shielded: a caller that goes away does not cancel the others' answer.
        return asyncio.shield(pending)

    def _landed(self, text: str, done: asyncio.Future[list[RouteMatch]]) -> None:
        if self._inflight.get(text) is done:
            del self._inflight[text]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone away

    async def aclose(self) -> None:
        await self.batcher.aclose()

    def decide_rules_only(self, request: RouteRequest, request_id: str) -> RouteDecided:
        """The rules-only baseline: overrides and rules, else the default route."""
        draft, decided = self._before_semantic(request, request_id)
        if decided is not None:
            return decided
        return self._fallback(draft, "low_confidence")

    # -- layers -------------------------------------------------------------------------

    def _before_semantic(
        self, request: RouteRequest, request_id: str
    ) -> tuple[_Draft, RouteDecided | None]:
        started = time.perf_counter()
        text = request.match_text(self.config.semantic.match_text)
        draft = _Draft(request, request_id, started, text)
        decided = self._override(draft)
        if decided is None:
            decided = self._apply_rules(draft)
        if decided is None and not draft.text:
            decided = self._fallback(draft, "default")
        return draft, decided

    def _override(self, draft: _Draft) -> RouteDecided | None:
        t0 = time.perf_counter()
        request = draft.request
        target: str | None = None
        if request.override:
            if request.override not in self._routes:
                raise UnknownRouteError(
                    f"unknown route {request.override!r}; routes: {', '.join(self._routes)}"
                )
            target = request.override
        elif request.requested_model is not None:
            model = request.requested_model
            if model in self.aliases:
                target = self.aliases[model]
            elif model in self._claimed_models:
                target = self._claimed_models[model]
            else:
                draft.attempts.append(
                    LayerAttempt(layer="passthrough", selected_route=None, confidence=1.0,
                                 latency_ms=_ms(t0), decided=True)
                )
                return self._event(
                    draft, PASSTHROUGH_ROUTE, model, "passthrough", "passthrough", NO_EVIDENCE
                )
        if target is None:
            draft.attempts.append(LayerAttempt(layer="override", latency_ms=_ms(t0)))
            return None
        draft.attempts.append(
            LayerAttempt(layer="override", selected_route=target, confidence=1.0,
                         latency_ms=_ms(t0), decided=True)
        )
        return self._event(draft, target, self._routes[target].target_model, "override",
                           "override", Evidence(score=1.0))

    def _apply_rules(self, draft: _Draft) -> RouteDecided | None:
        if not self._rules:
            return None
        t0 = time.perf_counter()
        for rule, regex in self._rules:
            if _rule_matches(rule, regex, draft.request, draft.text):
                draft.attempts.append(
                    LayerAttempt(layer="rules", selected_route=rule.route,
                                 confidence=rule.confidence, latency_ms=_ms(t0), decided=True)
                )
                return self._event(draft, rule.route, self._routes[rule.route].target_model,
                                   "rule", "rules", Evidence(score=rule.confidence))
        draft.attempts.append(LayerAttempt(layer="rules", latency_ms=_ms(t0)))
        return None

    def _rank_batch(self, texts: list[str]) -> list[list[RouteMatch]]:
        if self.encoder is None or self.matcher is None:
            raise RuntimeError("no encoder or route bank loaded")
        dense = self.encoder.encode(texts)
        sparse = [SparseEncoder.query(text) for text in texts]
        return self.matcher.match_many(dense, sparse, self.config.semantic)

    def _rank_pieces(self, texts: list[str]) -> Iterator[list[RouteMatch]]:
        """``_rank_batch`` in at most ``ANSWER_PIECES`` pieces (none smaller than the
        encoder's preferred batch), so the first callers of a big batch are answered
        before its last text is encoded. One text per piece costs throughput under load;
        pieces of an eighth of the batch cost none measurable (bench/gateway.py,
        /v1/route saturation), and a small batch still goes one text at a time."""
        step = max(self._piece, math.ceil(len(texts) / ANSWER_PIECES))
        for start in range(0, len(texts), step):
            yield from self._rank_batch(texts[start : start + step])

    def _semantic(self, draft: _Draft, ranked: list[RouteMatch], t0: float) -> RouteDecided:
        top = ranked[0]
        second = ranked[1] if len(ranked) > 1 else None
        threshold = self._routes[top.route_id].threshold
        margin = top.score - second.score if second else top.score
        assert self.matcher is not None
        # A probability is relative to the other routes: the nearest utterance must also
        # be as close as the bank's own utterances are to theirs (the evidence floor).
        known = top.entry is None or top.match_score >= self.matcher.model.evidence_floor
        confident = top.score >= threshold and margin >= self.config.margin and known
        draft.attempts.append(
            LayerAttempt(layer="semantic", selected_route=top.route_id, confidence=top.score,
                         threshold=threshold, latency_ms=_ms(t0), decided=confident)
        )
        evidence = Evidence(score=top.score, second=second, observed_margin=margin,
                            threshold=threshold)
        if confident:
            return self._event(draft, top.route_id, self._routes[top.route_id].target_model,
                               "semantic", "semantic", evidence, match=top)
        return self._fallback(draft, "low_confidence", evidence)

    def _embedding_error(self, draft: _Draft, exc: Exception, t0: float) -> RouteDecided:
        draft.attempts.append(
            LayerAttempt(layer="semantic", latency_ms=_ms(t0), error=type(exc).__name__)
        )
        return self._fallback(draft, "embedding_error")

    def _fallback(self, draft: _Draft, reason: DecisionReason,
                  evidence: Evidence = NO_EVIDENCE) -> RouteDecided:
        route = self.config.default_route
        draft.attempts.append(
            LayerAttempt(layer="fallback", selected_route=route, decided=True)
        )
        return self._event(draft, route, self._routes[route].target_model, reason, "fallback",
                           evidence)

    # -- the event ----------------------------------------------------------------------

    def _event(
        self,
        draft: _Draft,
        route_id: str,
        target_model: str,
        reason: DecisionReason,
        layer: DecisionLayer,
        scores: Evidence,
        *,
        match: RouteMatch | None = None,
    ) -> RouteDecided:
        request = draft.request
        second, threshold = scores.second, scores.threshold
        semantic_evidence = second is not None or threshold is not None
        evidence = match.entry if match is not None else None
        return RouteDecided(
            request_id=draft.request_id,
            route_id=route_id,
            target_model=target_model,
            reason=reason,
            layer=layer,
            score=scores.score,
            second_route_id=second.route_id if second else None,
            second_score=second.score if second else None,
            margin=scores.observed_margin,
            threshold=threshold,
            required_margin=self.config.margin if semantic_evidence else None,
            attempts=tuple(draft.attempts),
            decision_latency_ms=_ms(draft.started),
            config_source=self.loaded.source,
            config_sha256=self.loaded.sha256,
            route_bank_sha256=self.matcher.sha256 if self.matcher else None,
            match_source=evidence.source if evidence else None,
            match_index=evidence.index if evidence else None,
            match_text_sha256=evidence.text_sha256 if evidence else None,
            match_score=match.match_score if match and evidence else None,
            match_provenance=evidence.provenance if evidence else None,
            prompt_sha256=request.prompt_sha256,
            prompt_chars=request.prompt_chars,
            format=FormatSignals(
                tools_present=request.tools_present,
                tool_history=request.tool_history,
                tool_choice=request.tool_choice,
                message_count=len(request.messages),
                input_chars=request.prompt_chars + request.tools_chars,
                response_format=request.response_format,
                match_text_cut=draft.cut,
            ),
            requested_model=request.requested_model,
            gateway_instance=self.instance,
            client_request_id=request.correlation_id,
        )


def _compile(rule: RuleConfig) -> re.Pattern[str] | None:
    return re.compile(rule.when.regex, re.IGNORECASE) if rule.when.regex else None


def _has_keyword(text: str, keyword: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(keyword.lower())}(?!\w)", text) is not None


def _rule_matches(
    rule: RuleConfig, regex: re.Pattern[str] | None, request: RouteRequest, text: str
) -> bool:
    when = rule.when
    lowered = text.lower()
    checks: Sequence[Callable[[], bool]] = (
        lambda: when.has_tools is None or request.tools_present == when.has_tools,
        lambda: when.keywords is None
        or (
            (not when.keywords.any or any(_has_keyword(lowered, k) for k in when.keywords.any))
            and all(_has_keyword(lowered, k) for k in when.keywords.all)
        ),
        lambda: regex is None or regex.search(text) is not None,
        lambda: when.min_input_chars is None or request.prompt_chars >= when.min_input_chars,
        lambda: when.max_input_chars is None or request.prompt_chars <= when.max_input_chars,
        lambda: when.min_messages is None or len(request.messages) >= when.min_messages,
        lambda: when.requested_model is None or request.requested_model == when.requested_model,
    )
    return all(check() for check in checks)

