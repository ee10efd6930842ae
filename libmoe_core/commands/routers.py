"""``libmoe routers``: list the registered routers (plugins included) and their LibMoE aliases."""


def register(sub) -> None:
    p = sub.add_parser("routers", help="list registered routers")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..moe import ROUTER_ALIASES, ROUTERS, load_router_plugins

    load_router_plugins()
    for name, cls in sorted(ROUTERS.items()):
        aliases = [a for a, n in ROUTER_ALIASES.items() if n == name]
        doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0]  # a plugin may have no docstring
        alias_text = f" (LibMoE: {', '.join(aliases)})" if aliases else ""
        print(f"{name:<17}{alias_text:<32} {doc}")
    return 0
