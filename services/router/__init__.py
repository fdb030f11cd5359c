"""The decision core: config, encoders, route bank and cascade. Pure: no Kafka, no HTTP.

Callers use these names; the modules behind them are the core's own business.
"""

from routemesh.services.router.cascade import (
    AUTO_MODEL,
    PASSTHROUGH_ROUTE,
    Router,
    UnknownRouteError,
)
from routemesh.services.router.config import (
    ConfigError,
    EncoderBackend,
    EncoderConfig,
    EscalationGates,
    LoadedConfig,
    Route,
    RoutingConfig,
    load_config,
    parse_config,
)
from routemesh.services.router.datasets import DatasetError, file_sha256, load_dataset
from routemesh.services.router.encoders import CachingEncoder, build_dense_encoder
from routemesh.services.router.evaluate import (
    EvalReport,
    compare,
    decision_sha256,
    evaluate,
    score,
    unrouted_warning,
    write_reports,
)
from routemesh.services.router.factory import (
    StaleBankError,
    build_route_bank,
    load_router,
    open_qdrant,
)
from routemesh.services.router.request import ChatBody, Message, RouteRequest
from routemesh.services.router.watch import WatchedConfig

__all__ = [
    "AUTO_MODEL",
    "PASSTHROUGH_ROUTE",
    "CachingEncoder",
    "ChatBody",
    "ConfigError",
    "DatasetError",
    "EncoderBackend",
    "EncoderConfig",
    "EscalationGates",
    "EvalReport",
    "LoadedConfig",
    "Message",
    "Route",
    "RouteRequest",
    "Router",
    "RoutingConfig",
    "StaleBankError",
    "UnknownRouteError",
    "WatchedConfig",
    "build_dense_encoder",
    "build_route_bank",
    "compare",
    "decision_sha256",
    "evaluate",
    "file_sha256",
    "load_config",
    "load_dataset",
    "load_router",
    "open_qdrant",
    "parse_config",
    "score",
    "unrouted_warning",
    "write_reports",
]
