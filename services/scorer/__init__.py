"""The scorer: decisions joined with their outcomes into accuracy per route and layer,
threshold advice with its evidence, and review candidates in clusters. The ledger, the
advice and the candidates are pure; ``service`` runs them on the stream."""

from routemesh.services.scorer.advice import AdvicePolicy, advise
from routemesh.services.scorer.candidates import CandidatePolicy, candidate, clusters
from routemesh.services.scorer.ledger import Ledger, Limits
from routemesh.services.scorer.patch import ConfigChange
from routemesh.services.scorer.views import LedgerDecision, LedgerObservation, LedgerOutcome, view

__all__ = [
    "AdvicePolicy",
    "CandidatePolicy",
    "ConfigChange",
    "Ledger",
    "LedgerDecision",
    "LedgerObservation",
    "LedgerOutcome",
    "Limits",
    "advise",
    "candidate",
    "clusters",
    "view",
]
