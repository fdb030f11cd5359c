"""Drift detection: verdicts per target model and route from the decision and
observation streams. The detector itself is pure (``routemesh drift report`` runs it on
audit files); ``service`` runs it on Kafka."""

from routemesh.services.drift_detector.detector import (
    ALL_ROUTES,
    OTHER,
    Detector,
    Pinned,
    Snapshot,
    Transition,
)
from routemesh.services.drift_detector.presets import RESPONSE, ROUTING, Preset
from routemesh.services.drift_detector.signals import (
    DriftDecision,
    DriftObservation,
    Verdict,
    unserved_attempts,
)

__all__ = [
    "ALL_ROUTES",
    "OTHER",
    "RESPONSE",
    "ROUTING",
    "Detector",
    "DriftDecision",
    "DriftObservation",
    "Pinned",
    "Preset",
    "Snapshot",
    "Transition",
    "Verdict",
    "unserved_attempts",
]
