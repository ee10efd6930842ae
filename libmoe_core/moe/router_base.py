"""The router base class, its output record, the auxiliary losses and the registry.

Notation used in shape comments: T tokens (flattened), d hidden size, E experts,
S router slots (S = E for most routers; tcmoe and moepp have extra slots),
k experts chosen per token.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BALANCE_COEF = 0.01
DEFAULT_Z_COEF = 0.001


@dataclass
class RouterOutput:
    """One routing decision for T tokens."""

    experts: torch.Tensor  # [T, k] int64 slot ids, rank order (best first)
    weights: torch.Tensor  # [T, k] fp32 combine weights (signed for tcmoe's negative slots)
    probs: torch.Tensor  # [T, S] fp32 full router distribution over slots
    logits: torch.Tensor  # [T, S'] fp32 pre-normalisation scores (z-loss input)
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, scalar each
    aux_loss: torch.Tensor | None = None  # scalar: sum of coef * term


# --------------------------------------------------------------------------- losses


def balance_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard load-balance loss ``E * sum_e f_e * P_e``; 1.0 at perfect balance.

    ``f_e`` is the share of all T*k routing slots (every rank, whole batch) that chose
    expert e; ``P_e`` the mean router probability of e. Ids outside [0, E) are ignored.
    probs: [T, E], experts: [T, k].
    """
    flat = experts.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    # a scatter, not bincount of flat[valid]: both of those wait for the GPU (output sizes from the data)
    counts = probs.new_zeros(num_experts).scatter_add_(0, flat.clamp(0, num_experts - 1), valid.to(probs.dtype))  # [E]
    f = counts / max(flat.numel(), 1)
    p = probs.mean(dim=0)  # [E]
    return num_experts * torch.sum(f * p)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [T, S]."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def fp32_math(device_type: str):
    """A context in which autocast is off, so fp32 inputs give fp32 results."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- selection helpers


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool = True):
    """Softmax scores, top-k, weights renormalised over the chosen k.

    Returns (experts [T, k], weights [T, k], probs [T, E]).
    """
    probs = torch.softmax(logits, dim=-1)
    top_p, idx = probs.topk(k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True) if normalize else top_p
    return idx, weights, probs


def sigmoid_topk(logits: torch.Tensor, k: int, selection_bias: torch.Tensor | None = None, normalize: bool = True):
    """Sigmoid scores, top-k (of score + optional non-learned bias), weights s_i / sum of chosen s
    (``normalize=False``: s_i itself).

    ``probs`` is s normalised over all experts, so it is a distribution for analysis
    and the balance loss. Returns (experts [T, k], weights [T, k], probs [T, E]).
    The ratios are softmaxes of log s: s / sum(s) underflows to 0 once every score does (logits
    below about -47 in fp32), which dropped the token's output.
    """
    log_scores = F.logsigmoid(logits)  # [T, E]
    # without a bias, rank by log s (the order of s, without fp32's ties where s saturates at 0 or 1)
    ranking = log_scores if selection_bias is None else torch.sigmoid(logits) + selection_bias
    idx = ranking.topk(k, dim=-1).indices  # [T, k]
    probs = torch.softmax(log_scores, dim=-1)  # [T, E] s / sum(s)
    if normalize:
        weights = torch.softmax(log_scores.gather(-1, idx), dim=-1)  # [T, k] s_i / sum of the chosen s
    else:
        weights = torch.sigmoid(logits.gather(-1, idx))  # [T, k] s_i
    return idx, weights, probs


# --------------------------------------------------------------------------- base class


class Router(nn.Module):
    """Base of every router: scores tokens, selects k slots, reports aux losses.

    Subclasses implement :meth:`scores` (fp32 logits) and, when selection is not
    "softmax, top-k, renormalise", :meth:`select`. All router math runs in fp32
    whatever the model dtype. Slots map to feed-forward experts through
    :attr:`slot_to_ffn` (``None`` means slot i is expert i; -1 marks a slot with no
    feed-forward expert, such as MoE++'s zero expert or TC-MoE's null slot).
    """

    name: ClassVar[str] = "base"
    aliases: ClassVar[tuple[str, ...]] = ()
    default_balance_coef: ClassVar[float] = DEFAULT_BALANCE_COEF
    default_z_coef: ClassVar[float] = DEFAULT_Z_COEF
    #: The layer's output needs in_features == out_features (constant/copy experts).
    requires_square: ClassVar[bool] = False
    #: Floating buffers of non-gradient router state that stay fp32 when the model is
    #: cast (``model.to(torch.bfloat16)``): a bf16 bias cannot take small steps.
    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    #: Submodules that never train (the hyper router's fixed hypernetwork): see :meth:`freeze_fixed`.
    fixed_submodules: ClassVar[tuple[str, ...]] = ()
    #: The gate cannot learn from a zero init (its logits multiply two initialised factors, or
    #: normalise the gate's rows), so ``init_std`` must be > 0.
    needs_nonzero_init: ClassVar[bool] = False
    #: Options a subclass reads from ``**kw`` itself rather than as named ``__init__`` parameters
    #: (named ones are found by :func:`router_option_names`).
    extra_options: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        balance_coef: float | None = None,
        z_coef: float | None = None,
        seed: int | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.hidden_size = hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.num_experts = num_experts = _check_positive_int("num_experts", num_experts)
        self.top_k = top_k = _check_positive_int("top_k", top_k)
        # 0: a zero gate (uniform routing at first), for the gates that can learn from it
        self.init_std = _check_number(f"router '{self.name}' init_std", init_std, positive=self.needs_nonzero_init)
        self.seed = seed
        self.coefs = {
            "balance": _check_coef("balance_coef", self.default_balance_coef if balance_coef is None else balance_coef),
            "z": _check_coef("z_coef", self.default_z_coef if z_coef is None else z_coef),
        }
        self.register_load_state_dict_post_hook(_reset_computed_buffers_after_load)  # after its children too
        if top_k > self.num_choices:
            raise ValueError(
                f"router '{self.name}': top_k={top_k} exceeds the {self.num_choices} choosable slots "
                f"(num_experts={num_experts}); use top_k <= {self.num_choices}"
            )

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The router's non-persistent buffers as a fresh build has them, computed from its sizes
        (slot tables, load counters). Registered by :meth:`register_computed_buffers` and made
        again after every state-dict load, as no checkpoint holds them (a layer built on the meta
        device and then ``to_empty`` would otherwise keep uninitialised memory there). A router of
        your own lists its non-persistent buffers here."""
        return {}

    def register_computed_buffers(self) -> None:
        """Register :meth:`computed_buffers` (call at the end of a subclass's ``__init__``)."""
        for name, value in self.computed_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def reset_computed_buffers(self) -> None:
        """Put fresh :meth:`computed_buffers` values in place: copied into the existing buffer where
        it can take them (a wrapper such as DDP keeps its references), else as a new buffer on the
        device of the router's parameters (a load with ``assign=True`` leaves meta buffers behind)."""
        device = next((p.device for p in self.parameters() if not p.is_meta), None)
        for name, value in self.computed_buffers().items():
            old = self._buffers.get(name)
            if old is not None and not old.is_meta and old.shape == value.shape and old.dtype == value.dtype:
                with torch.no_grad():
                    old.copy_(value)
                continue
            target = old.device if old is not None and (not old.is_meta or device is None) else device
            self.register_buffer(name, value.to(target) if target is not None else value, persistent=False)

    def freeze_fixed(self) -> None:
        """``requires_grad = False`` on the :attr:`fixed_submodules` (after building, after loading,
        and after a training stage makes everything else trainable)."""
        for name in self.fixed_submodules:
            getattr(self, name).requires_grad_(False)

    # ---- structure (override where a router has extra slots)
    @property
    def num_slots(self) -> int:
        """Columns of ``probs``: the router's full distribution."""
        return self.num_experts

    @property
    def num_choices(self) -> int:
        """How many distinct slots top-k picks from."""
        return self.num_slots

    @property
    def num_ffn_experts(self) -> int:
        """Feed-forward experts the layer must hold."""
        return self.num_experts

    @property
    def always_on_experts(self) -> tuple[int, ...]:
        """Feed-forward experts every token uses (a shared expert): exempt from the capacity."""
        return ()

    @property
    def preserves_dense_output(self) -> bool:
        """True when the feed-forward combine weights of every token sum to 1.

        Then an upcycled layer (identical experts) reproduces the dense MLP exactly.
        """
        return True

    # ---- training-loop hooks (no-ops unless a router needs them)
    def current_k(self) -> int:
        return self.top_k

    def set_step(self, step: int, total_steps: int) -> None:
        """Tell the router the optimiser step (used by routers with schedules)."""

    def on_step_end(self) -> None:
        """Called after each optimiser step (used by routers with non-gradient state)."""

    def discard_step(self) -> None:
        """Called instead of :meth:`on_step_end` after a step the optimiser skipped (a non-finite
        gradient): forget what the step observed without acting on it."""

    # ---- the math
    def make_gate(self, out_features: int, in_features: int | None = None, bias: bool = False) -> nn.Linear:
        """A gate projection initialised N(0, init_std) from this router's seed."""
        gate = nn.Linear(in_features or self.hidden_size, out_features, bias=bias)
        self.reset_normal(gate.weight)
        if bias:
            nn.init.zeros_(gate.bias)
        return gate

    def reset_normal(self, param: torch.Tensor, std: float | None = None) -> None:
        gen = None
        if self.seed is not None:
            # One generator per call site would repeat numbers; advance by the tensor's size.
            gen = getattr(self, "_init_gen", None)
            if gen is None:
                gen = self._init_gen = torch.Generator().manual_seed(int(self.seed))
        with torch.no_grad():
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_(values * (self.init_std if std is None else std))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, S'] for fp32 tokens x [T, d]."""
        raise NotImplementedError

    def select(self, logits: torch.Tensor):
        """(experts [T, k], weights [T, k], probs [T, S]) from logits."""
        return softmax_topk(logits, self.current_k())

    def compute_aux_terms(self, out: RouterOutput) -> dict[str, torch.Tensor]:
        return {
            "balance": balance_loss(out.probs, out.experts, self.num_slots),
            "z": z_loss(out.logits),
        }

    def extra_output(self, x: torch.Tensor, out: RouterOutput) -> torch.Tensor | None:
        """Output of non-feed-forward experts (constant, copy), added to the layer output."""
        return None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: [T, d] in any dtype -> RouterOutput (fp32, also under autocast)."""
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"router '{self.name}' expects tokens flattened to [T, {self.hidden_size}], got shape {tuple(x.shape)}"
            )
        with fp32_math(x.device.type):
            logits = self.scores(x.float())
            experts, weights, probs = self.select(logits)
            out = RouterOutput(experts=experts, weights=weights, probs=probs, logits=logits)
            out.aux_terms = self.compute_aux_terms(out)
        missing = sorted(set(out.aux_terms) - set(self.coefs))
        if missing:
            raise KeyError(f"router '{self.name}' reports aux term(s) {missing} without a coefficient in self.coefs")
        # a zero coefficient switches its term off exactly (0 * inf would be NaN)
        terms = [coef * term for name, term in out.aux_terms.items() if (coef := self.coefs[name]) != 0]
        out.aux_loss = sum(terms) if terms else logits.new_zeros(())  # a tensor even without aux terms
        return out

    def _apply(self, fn, recurse: bool = True):
        """Module casts and moves; the :attr:`fp32_buffers` move but stay fp32 (exactly: not
        cast to the new dtype and back)."""
        kept = {name: self._buffers.pop(name) for name in self.fp32_buffers if self._buffers.get(name) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == torch.float32 else buf.to(device=moved.device)
        return self

    def ffn_ids(self, experts: torch.Tensor) -> torch.Tensor:
        """Map slot ids [T, k] to feed-forward expert ids (-1: no feed-forward expert)."""
        table = getattr(self, "slot_to_ffn", None)  # buffer [S] on routers with extra slots
        return experts if table is None else table[experts]

    def extra_repr(self) -> str:
        coefs = ", ".join(f"{k}_coef={v:g}" for k, v in self.coefs.items())
        return f"name={self.name}, hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, {coefs}"


def _reset_computed_buffers_after_load(router: Router, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: no checkpoint holds the computed buffers, so they are made again."""
    router.reset_computed_buffers()


def _check_positive_int(field_name: str, value) -> int:
    """``value`` as an int (any integral type: numpy's too), or an error naming ``field_name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field_name} must be a positive integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_number(field_name: str, value, *, positive: bool = False) -> float:
    """``value`` as a finite float >= 0 (``positive``: > 0), or an error naming ``field_name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field_name} must be a number, got {value!r} ({type(value).__name__})")  # noqa: TRY004 (config errors are ValueErrors throughout)
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{field_name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _check_coef(field_name: str, value) -> float:
    return _check_number(field_name, value)


def _check_bool(field_name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field_name} must be true or false, got {value!r} ({type(value).__name__})")  # noqa: TRY004
    return value


# --------------------------------------------------------------------------- registry

ROUTERS: dict[str, type[Router]] = {}
ROUTER_ALIASES: dict[str, str] = {}


def register_router(name: str, *, aliases: tuple[str, ...] = ()):
    """Class decorator: make a Router subclass available under ``name`` (and aliases)."""

    def wrap(cls: type[Router]) -> type[Router]:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"@register_router('{name}') needs a Router subclass, got {cls!r}")
        # A name or alias already taken is an error unless it already means this class (re-running
        # the decorator, e.g. on a module reload).
        taken = [n for n in (name, *aliases) if n in ROUTERS or n in ROUTER_ALIASES]
        clashes = [n for n in taken if ROUTERS.get(ROUTER_ALIASES.get(n, n)) is not cls]
        if clashes:
            owners = {n: ROUTER_ALIASES.get(n, n) for n in clashes}
            raise ValueError(f"router name(s) {clashes} already registered (by {owners})")
        cls.name = name
        cls.aliases = tuple(aliases)
        ROUTERS[name] = cls
        for alias in aliases:
            ROUTER_ALIASES[alias] = name
        return cls

    return wrap


ROUTER_ENTRY_POINT_GROUP = "libmoe.routers"
ROUTER_MODULES_ENV = "LIBMOE_ROUTER_MODULES"
_loaded_router_modules: set[str] = set()


class RouterPluginError(ImportError):
    """A module registering routers (an entry point, or ``$LIBMOE_ROUTER_MODULES``) failed to import."""


def load_router_plugins() -> list[str]:
    """Import the modules that register routers of their own; returns the ones newly imported.

    Two sources, so that every process (the ``libmoe`` CLI, DeepSpeed workers, lmms-eval,
    ``from_pretrained``) knows a user's router by name: the ``libmoe.routers`` entry points of
    installed packages (``[project.entry-points."libmoe.routers"] mine = "my_pkg.routers"``) and
    the comma-separated module names in ``$LIBMOE_ROUTER_MODULES`` (importable from PYTHONPATH;
    subprocesses inherit it). A module that fails to import is an error naming it.
    """
    import importlib
    import os
    from importlib.metadata import entry_points

    sources = [(ep.value.split(":")[0], f"entry point {ep.name!r} of group {ROUTER_ENTRY_POINT_GROUP!r}")
               for ep in entry_points(group=ROUTER_ENTRY_POINT_GROUP)]
    sources += [(m.strip(), f"${ROUTER_MODULES_ENV}") for m in os.environ.get(ROUTER_MODULES_ENV, "").split(",")
                if m.strip()]
    imported = []
    for module, origin in sources:
        if module in _loaded_router_modules:
            continue
        try:
            importlib.import_module(module)
        except Exception as err:
            raise RouterPluginError(f"router module {module!r} (from {origin}) failed to import: {err}") from err
        _loaded_router_modules.add(module)
        imported.append(module)
    return imported


def resolve_router_name(name: str) -> str:
    """Our name for ``name`` (ours, a LibMoE alias, or a plugin's); unknown names list the known ones."""
    if name not in ROUTERS and name not in ROUTER_ALIASES:
        load_router_plugins()  # a user's router, registered when its module is imported
    if name in ROUTERS:
        return name
    if name in ROUTER_ALIASES:
        return ROUTER_ALIASES[name]
    known = ", ".join(sorted(ROUTERS))
    aliases = ", ".join(f"{a}->{n}" for a, n in sorted(ROUTER_ALIASES.items()))
    raise ValueError(f"unknown router {name!r}. Known routers: {known}. LibMoE aliases: {aliases}")


def get_router_class(name: str) -> type[Router]:
    return ROUTERS[resolve_router_name(name)]


_BUILD_ARGUMENTS = ("self", "hidden_size", "num_experts", "top_k", "seed")  # given by build_moe


def router_option_names(cls: type[Router]) -> list[str]:
    """The keyword options a router class takes: its ``__init__``'s and, through ``**kw``, its bases',
    plus any class's ``extra_options``."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(klass.__dict__.get("extra_options", ()))
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return sorted(names - set(_BUILD_ARGUMENTS))


def check_router_options(name: str, options: dict, where: str = "router_options", *,
                         num_experts: int | None = None, top_k: int | None = None, **coefs) -> None:
    """An error naming ``where``, the router and its options when ``options`` has a key it does not take.

    Given ``num_experts`` and ``top_k`` (and ``balance_coef`` / ``z_coef`` in ``coefs``), one of the
    kit's routers is also built once, small and off the global RNG, so its own value checks
    (``top_k`` against a shared expert, ``k_min <= k_max``, a positive temperature, ...) fail now,
    not when a training stage builds the model (a plugin router's wait for the real widths)."""
    cls = get_router_class(name)
    known = router_option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{where}: router {name!r} takes no option(s) {unknown}; its options: {known} (a router "
                         f"that reads an option from **kwargs lists it in its extra_options)")
    if num_experts is None or top_k is None or not cls.__module__.startswith("libmoe_core."):
        return  # a plugin router's checks may need the real widths: they run when the model is built
    with torch.random.fork_rng(devices=[]):
        try:
            cls(16, num_experts, top_k, seed=0, **{k: v for k, v in coefs.items() if v is not None}, **options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: router {name!r} (num_experts={num_experts}, top_k={top_k}): {err}") from None
