"""MoE core: routers (one base, registered variants), stacked experts, grouped dispatch, upcycling."""

from . import routers as _routers  # noqa: F401  (registers the built-in routers)
from .experts import Experts, grouped_linear
from .layer import MoELayer, Routing, collect_aux_loss, moe_layers, routers_step_end, set_router_step
from .router_base import (
    DEFAULT_BALANCE_COEF,
    DEFAULT_Z_COEF,
    ROUTER_ALIASES,
    ROUTERS,
    Router,
    RouterOutput,
    balance_loss,
    check_router_options,
    get_router_class,
    load_router_plugins,
    register_router,
    resolve_router_name,
    z_loss,
)
from .upcycle import build_moe, read_dense_mlp

__all__ = [
    "DEFAULT_BALANCE_COEF", "DEFAULT_Z_COEF", "ROUTERS", "ROUTER_ALIASES", "Experts", "MoELayer", "Router",
    "RouterOutput", "Routing", "balance_loss", "build_moe", "check_router_options", "collect_aux_loss",
    "get_router_class",
    "grouped_linear", "load_router_plugins", "moe_layers", "read_dense_mlp", "register_router", "resolve_router_name",
    "routers_step_end", "set_router_step", "z_loss",
]
