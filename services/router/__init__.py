"""The decision core: config, encoders, route bank and cascade. Pure: no Kafka, no HTTP.

Callers use these names; the modules behind them are the core's own business.
"""

from routemesh.services.router.cascade import (
    AUTO_MODEL,
    PASSTHROUGH_ROUTE,
    Router,
    RouteRequest,
    UnknownRouteError,
)
from routemesh.services.router.config import (
    ConfigError,
    LoadedConfig,
    Route,
    RoutingConfig,
    load_config,
)
from routemesh.services.router.factory import StaleBankError, load_router, open_qdrant

__all__ = [
    "AUTO_MODEL",
    "PASSTHROUGH_ROUTE",
    "ConfigError",
    "LoadedConfig",
    "Route",
    "RouteRequest",
    "Router",
    "RoutingConfig",
    "StaleBankError",
    "UnknownRouteError",
    "load_config",
    "load_router",
    "open_qdrant",
]
