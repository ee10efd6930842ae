"""Routers: registry, shapes, per-router behaviour, aux losses against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from libmoe_core.moe import (
    ROUTERS,
    Router,
    balance_loss,
    build_moe,
    get_router_class,
    register_router,
    resolve_router_name,
    routers_step_end,
    set_router_step,
    z_loss,
)
from libmoe_core.moe.router_base import ROUTER_ALIASES

ALL_ROUTERS = sorted(ROUTERS)
LIBMOE_NAMES = {
    "smoe": "smoe",
    "smoe_sigmoidgating": "sigmoid",
    "smoe_cosinegating": "cosine",
    "smoe_perturbed": "perturbed_cosine",
    "hyperrouter": "hyper",
    "xmoe": "xmoe",
    "smoe_share": "shared",
    "smoe_sharev3": "shared_sigmoid",
    "smoe_tcmoe": "tcmoe",
    "smoe_plus_plus": "moepp",
}


def make_router(name, d=16, e=4, k=2, **kw):
    return get_router_class(name)(d, e, k, seed=0, **kw)


def test_registry_has_every_router_of_the_issue():
    expected = {"smoe", "cosine", "sigmoid", "hyper", "perturbed_cosine", "xmoe", "shared", "shared_sigmoid", "tcmoe", "moepp", "auxfree"}
    assert expected <= set(ROUTERS)
    assert all(issubclass(cls, Router) for cls in ROUTERS.values())


@pytest.mark.parametrize("libmoe_name,ours", sorted(LIBMOE_NAMES.items()))
def test_libmoe_aliases(libmoe_name, ours):
    assert resolve_router_name(libmoe_name) == ours
    assert get_router_class(libmoe_name) is ROUTERS[ours]


def test_unknown_router_lists_known_ones():
    with pytest.raises(ValueError) as err:
        resolve_router_name("no_such_router")
    message = str(err.value)
    assert "no_such_router" in message
    for name in ("smoe", "sigmoid", "auxfree", "smoe_cosinegating"):
        assert name in message
    with pytest.raises(ValueError, match="no_such_router"):
        build_moe(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), router="no_such_router")


def test_register_a_new_router():
    @register_router("test_first_expert_only")
    class FirstExpert(Router):
        def scores(self, x):
            logits = torch.full((x.shape[0], self.num_experts), -10.0)
            logits[:, 0] = 10.0
            return logits

    try:
        layer = build_moe(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), "test_first_expert_only", 3, 1)
        layer(torch.randn(5, 4))
        assert (layer.last_routing.experts == 0).all()
        with pytest.raises(ValueError, match="already registered"):
            register_router("test_first_expert_only")(type("Other", (Router,), {}))
        # the same class again may not take another router's name or alias either
        with pytest.raises(ValueError, match=r"\['hyperrouter'\] already registered \(by \{'hyperrouter': 'hyper'\}\)"):
            register_router("test_first_expert_only", aliases=("hyperrouter",))(FirstExpert)
        assert resolve_router_name("hyperrouter") == "hyper"
        register_router("test_first_expert_only")(FirstExpert)  # re-running the decorator is fine
        with pytest.raises(TypeError):
            register_router("not_a_router")(object)
    finally:
        ROUTERS.pop("test_first_expert_only", None)


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_router_output_contract(name):
    router = make_router(name)
    x = torch.randn(7, 16)
    out = router(x)
    k = router.top_k
    assert out.experts.shape == (7, k) and out.experts.dtype == torch.int64
    assert out.weights.shape == (7, k) and out.weights.dtype == torch.float32
    assert out.probs.shape == (7, router.num_slots) and out.probs.dtype == torch.float32
    assert ((out.experts >= 0) & (out.experts < router.num_slots)).all()
    assert all(len(set(row.tolist())) == k for row in out.experts), "a token chose the same slot twice"
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(7), atol=1e-5, rtol=0)
    assert set(out.aux_terms) >= {"balance", "z"}
    documented = {"balance": 1e-4 if name == "auxfree" else 0.01, "z": 0.001, "null": 1e-5}  # README / routers.md
    expected = sum(documented[n] * t for n, t in out.aux_terms.items())
    torch.testing.assert_close(out.aux_loss, expected)
    assert torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_router_math_is_fp32_for_bf16_models(name):
    router = make_router(name).to(torch.bfloat16)
    out = router(torch.randn(5, 16, dtype=torch.bfloat16))
    assert out.weights.dtype == torch.float32 and out.probs.dtype == torch.float32 and out.logits.dtype == torch.float32


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_router_math_is_fp32_under_autocast(name):
    """Autocast would run the gate in bf16; the router turns it off and matches fp32 exactly."""
    router = make_router(name)
    x = torch.randn(32, 16)
    reference = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits.dtype == torch.float32 and out.probs.dtype == torch.float32
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    assert torch.equal(out.experts, reference.experts)
    if name == "moepp":  # the constant expert's mixing gate is router math too
        layer = build_moe(nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 16)), "moepp", 4, 2, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            route = layer.router(x)
            extra = layer.router.extra_output(x, route)
        torch.testing.assert_close(extra, layer.router.extra_output(x, layer.router(x)), rtol=0, atol=0)


def test_router_input_must_be_flat_tokens_of_the_hidden_size():
    router = make_router("smoe")
    with pytest.raises(ValueError, match=r"router 'smoe' expects tokens flattened to \[T, 16\], got shape \(2, 3, 16\)"):
        router(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"got shape \(3, 17\)"):
        router(torch.randn(3, 17))
    layer = build_moe(nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 16)), "smoe", 4, 2)
    with pytest.raises(ValueError, match=r"MoELayer expects inputs \[\.\.\., 16\], got shape \(2, 3, 17\)"):
        layer(torch.randn(2, 3, 17))


def test_an_aux_term_without_a_coefficient_is_an_error():
    class Extra(get_router_class("smoe")):
        def compute_aux_terms(self, out):
            return {**super().compute_aux_terms(out), "entropy": out.probs.mean()}

    with pytest.raises(KeyError, match=r"aux term\(s\) \['entropy'\] without a coefficient"):
        Extra(16, 4, 2)(torch.randn(3, 16))


def test_router_option_values_are_checked():
    with pytest.raises(ValueError, match="null_coef must be a finite number >= 0"):
        make_router("tcmoe", null_coef=-1)
    with pytest.raises(ValueError, match="bias_update_rate must be a finite number >= 0"):
        make_router("auxfree", bias_update_rate=-1e-3)
    with pytest.raises(ValueError, match="routing_dim must be a positive integer, got 0"):
        make_router("xmoe", routing_dim=0)
    assert make_router("xmoe", e=8).proj.out_features == 4  # None: E / 2
    # each of these was accepted (NaN/inf outputs, or an option silently on) or a bare TypeError
    for name, options, needle in [
        ("xmoe", {"temperature": float("nan")}, "xmoe temperature must be a finite number > 0, got nan"),
        ("xmoe", {"temperature": 0}, "xmoe temperature must be a finite number > 0, got 0.0"),
        ("xmoe", {"temperature": "a"}, "xmoe temperature must be a number, got 'a' \\(str\\)"),
        ("smoe", {"balance_coef": float("inf")}, "balance_coef must be a finite number >= 0, got inf"),
        ("moepp", {"copy_expert": "no"}, "copy_expert must be true or false, got 'no'"),
        ("smoe", {"normalize": 0}, "normalize must be true or false"),
        ("hyper", {"k_min": 1.5}, "k_min must be a positive integer, got 1.5 \\(float\\)"),
        ("hyper", {"k_max": 2.0}, "k_max must be a positive integer, got 2.0"),
        ("smoe", {"init_std": -1}, "router 'smoe' init_std must be a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=needle):
            make_router(name, **options)
    numpy_sizes = get_router_class("smoe")(np.int64(16), np.int64(4), np.int64(2))  # numpy integers are integers
    assert (numpy_sizes.hidden_size, numpy_sizes.num_experts, numpy_sizes.top_k) == (16, 4, 2)
    assert type(numpy_sizes.top_k) is int


def test_a_zero_init_std_gives_a_zero_gate_where_the_gate_can_learn_from_it():
    assert torch.count_nonzero(make_router("smoe", init_std=0.0).gate.weight) == 0  # was refused by a > 0 check
    for name in ("xmoe", "hyper", "cosine", "perturbed_cosine"):  # stuck at uniform routing, or a 1/eps gradient
        with pytest.raises(ValueError, match=f"router '{name}' init_std must be a finite number > 0"):
            make_router(name, init_std=0.0)


def test_a_router_without_aux_terms_trains_in_the_model():
    """aux_loss was the int 0 (sum of nothing): the model's per-layer gradient check crashed on it."""
    from libmoe_core.model.presets import build_model

    @register_router("test_no_aux")
    class NoAux(get_router_class("smoe")):
        def compute_aux_terms(self, out):
            return {}

    try:
        out = make_router("test_no_aux")(torch.randn(3, 16))
        assert torch.is_tensor(out.aux_loss) and out.aux_loss.item() == 0.0
        model = build_model("tiny", router="test_no_aux", moe_vision=False, moe_llm_layers=[1]).train()
        ids = torch.randint(20, 400, (2, 7))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in placed_router_params(model))
    finally:
        ROUTERS.pop("test_no_aux", None)


def placed_router_params(model):
    from libmoe_core.model.placement import placed_moe_layers

    return [p for _, _, layer in placed_moe_layers(model) for p in layer.router.parameters()]


def test_upcycling_option_values_are_checked():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    for options, needle in [({"noise": float("nan")}, "noise must be a finite number >= 0, got nan"),
                            ({"noise": -1}, "noise must be a finite number >= 0, got -1.0"),
                            ({"capacity_factor": "a"}, "capacity_factor .* must be a number, got 'a'"),
                            ({"capacity_factor": 0}, "capacity_factor .* must be a finite number > 0")]:
        with pytest.raises(ValueError, match=needle):
            build_moe(mlp, "smoe", 4, 2, **options)


@pytest.mark.parametrize("name", ["sigmoid", "auxfree", "shared_sigmoid"])
def test_sigmoid_probs_stay_finite_when_every_score_underflows(name):
    router = make_router(name)
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
        router.gate.weight.fill_(-120.0 / 16)  # every logit -120 on ones: sigmoid(-120) == 0 in fp32
    out = router(torch.ones(5, 16))
    assert (torch.sigmoid(out.logits) == 0).all()
    assert torch.isfinite(out.probs).all() and torch.isfinite(out.weights).all(), name
    assert all(torch.isfinite(term) for term in out.aux_terms.values()), out.aux_terms  # balance was NaN


@pytest.mark.parametrize("name", ["sigmoid", "auxfree", "shared_sigmoid"])
@pytest.mark.parametrize("level", [-30.0, -48.0, -96.0, -200.0])
def test_sigmoid_weights_are_exact_score_ratios_at_any_logit(name, level):
    """s_i / sum of the chosen s underflowed to 0 once every chosen score did (logits below about
    -47): the token's routed output vanished. Oracle: the ratios in fp64 from the same logits, and
    right after upcycling the layer output equals the dense MLP's."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    layer = build_moe(mlp, name, 4, 2, seed=0)
    x = torch.rand(6, 16) + 0.5  # positive: logits = level * (1 + a little) on a constant gate
    with torch.no_grad():
        layer.router.gate.weight.copy_(level / x.sum(-1).mean() * (1 + 0.01 * torch.rand_like(layer.router.gate.weight)))
    out = layer.router(x)
    logits = out.logits.double()
    routed = out.experts if name != "shared_sigmoid" else out.experts[:, :-1]
    chosen = torch.sigmoid(logits[:, : layer.router.num_experts - (name == "shared_sigmoid")]).gather(-1, routed)
    expected = chosen / chosen.sum(-1, keepdim=True)
    weights = out.weights.double() if name != "shared_sigmoid" else out.weights[:, :-1].double() * 2  # half gate
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(6), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_a_zero_coefficient_switches_its_aux_term_off_even_when_the_term_is_infinite():
    router = make_router("smoe", balance_coef=0, z_coef=0)
    with torch.no_grad():
        out = router(torch.full((3, 16), 1e30))  # logits ~1e28: the z-loss (logsumexp squared) is inf
    assert math.isinf(out.aux_terms["z"].item())
    assert out.aux_loss.item() == 0.0  # 0 * inf was NaN and made the whole training loss NaN


def test_xmoe_gradient_of_a_zero_token_is_bounded():
    """F.normalize's default eps (1e-12) gave a zero token a ~1e8 input gradient: one such token
    shrank a clipped step's whole update. Bounded now, like the cosine router's (clamp 1e-6)."""
    grads = {}
    for name in ("xmoe", "cosine"):
        router = make_router(name)
        x = torch.zeros(2, 16, requires_grad=True)
        out = router(x)
        (out.probs * torch.linspace(-1, 1, out.probs.shape[-1])).sum().backward()
        grads[name] = x.grad.abs().max().item()
    assert math.isfinite(grads["xmoe"]) and grads["xmoe"] < 10 * grads["cosine"], grads  # was ~1e4 times it


def test_default_coefficients_are_never_silently_zero():
    for name in ALL_ROUTERS:
        router = make_router(name)
        assert router.coefs["balance"] > 0 and router.coefs["z"] > 0, name
    smoe = make_router("smoe")
    assert smoe.coefs == {"balance": 0.01, "z": 0.001}
    assert make_router("smoe", balance_coef=0.5, z_coef=0).coefs == {"balance": 0.5, "z": 0.0}
    with pytest.raises(ValueError, match="balance_coef"):
        make_router("smoe", balance_coef=-1)
    with pytest.raises(ValueError, match="z_coef"):
        make_router("smoe", z_coef="lots")
    with pytest.raises(ValueError, match="balance_coef must be a finite number >= 0, got nan"):
        make_router("smoe", balance_coef=float("nan"))


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_k_greater_than_choices_is_a_clear_error(name):
    with pytest.raises(ValueError, match="top_k"):
        make_router(name, e=4, k=get_router_class(name)(16, 4, 2).num_choices + 1)


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="num_experts"):
        make_router("smoe", e=0)
    with pytest.raises(ValueError, match="top_k"):
        make_router("smoe", k=0)
    with pytest.raises(ValueError, match="shared"):
        make_router("shared", e=4, k=1)


def test_seeds_differ_per_layer():
    a, b, a2 = make_router("smoe"), get_router_class("smoe")(16, 4, 2, seed=1), make_router("smoe")
    assert not torch.equal(a.gate.weight, b.gate.weight)
    torch.testing.assert_close(a.gate.weight, a2.gate.weight)
    unseeded = [get_router_class("smoe")(16, 4, 2) for _ in range(2)]
    assert not torch.equal(unseeded[0].gate.weight, unseeded[1].gate.weight)
    assert abs(a.gate.weight.std().item() - 0.02) < 0.005


# ---------------------------------------------------------------- aux losses, hand-computed


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    experts = torch.tensor([[0, 1], [1, 2]])
    # f = counts / (T*k) = [1, 2, 1] / 4 ; P = mean probs = [0.4, 0.4, 0.2]
    expected = 3 * (0.25 * 0.4 + 0.5 * 0.4 + 0.25 * 0.2)
    assert balance_loss(probs, experts, 3).item() == pytest.approx(expected)


def test_balance_loss_is_one_at_perfect_balance():
    e = 4
    probs = torch.full((8, e), 1 / e)
    experts = torch.arange(8).remainder(e).unsqueeze(-1)
    assert balance_loss(probs, experts, e).item() == pytest.approx(1.0)
    # all tokens on one expert with all the mass: E
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 1
    assert balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), e).item() == pytest.approx(e)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.exp(1) + math.exp(2))]
    assert z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2)


def test_smoe_router_values_hand_computed():
    router = make_router("smoe", d=2, e=3, k=2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    out = router(torch.tensor([[2.0, 1.0]]))
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), -1)
    assert out.experts.tolist() == [[0, 1]]
    torch.testing.assert_close(out.weights[0], p[:2] / p[:2].sum())
    torch.testing.assert_close(out.probs[0], p)
    assert out.aux_terms["z"].item() == pytest.approx(torch.logsumexp(torch.tensor([2.0, 1.0, 0.0]), 0).item() ** 2)


# ---------------------------------------------------------------- per-router behaviour


def test_hyper_router_k_schedule():
    router = make_router("hyper", e=8, k=4, k_min=1)
    router.train()
    schedule = []
    for step in range(11):
        router.set_step(step, 10)
        schedule.append(router.current_k())
        assert router(torch.randn(3, 16)).experts.shape == (3, router.current_k())
    # k(t) = round((k_max - k_min) * t / T) + k_min
    assert schedule == [round(3 * t / 10) + 1 for t in range(11)]
    assert schedule[0] == 1 and schedule[-1] == 4
    router.eval()
    router.set_step(0, 10)
    assert router.current_k() == 4 and router(torch.randn(3, 16)).experts.shape == (3, 4)
    with pytest.raises(ValueError, match="k_min"):
        make_router("hyper", e=4, k=2, k_min=3)


def test_set_router_step_reaches_every_layer():
    model = nn.Sequential(*[build_moe(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), "hyper", 4, 3, seed=i) for i in range(2)])
    model.train()
    set_router_step(model, 5, 10)
    assert [m.router.current_k() for m in model] == [2, 2]  # round(2 * 0.5) + 1


def test_hyper_hypernetwork_is_frozen_and_embedding_trains():
    router = make_router("hyper")
    assert not any(p.requires_grad for p in router.hypernet.parameters())
    out = router(torch.randn(4, 16))
    (out.weights.sum() + out.aux_loss).backward()
    assert router.embedding.grad is not None and router.embedding.grad.abs().sum() > 0


def test_auxfree_bias_moves_toward_underloaded_experts():
    router = make_router("auxfree", e=4, k=1, bias_update_rate=0.05)
    with torch.no_grad():  # expert 0 wins for every token at first
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 1.0
    router.train()
    x = torch.randn(64, 16).abs() + 0.1
    assert (router(x).experts == 0).all()
    routers_before = router.selection_bias.clone()
    router.on_step_end()
    step = router.selection_bias - routers_before
    assert step[0] < 0 and (step[1:] > 0).all()
    loads = []
    for _ in range(100):
        loads.append(torch.bincount(router(x).experts.flatten(), minlength=4).float())
        router.on_step_end()
    late_share = torch.stack(loads[-40:]).sum(0) / (40 * 64)
    assert late_share.max() < 0.4, f"balancing bias did not spread the load: {late_share}"
    assert (late_share > 0.1).all(), f"an expert stayed unused: {late_share}"
    # the bias is not learned and the combine weights ignore it
    assert "selection_bias" not in dict(router.named_parameters())
    model = nn.Sequential(build_moe(nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 16)), "auxfree", 4, 1))
    model.train()
    model(torch.randn(8, 16))
    before = model[0].router.selection_bias.clone()
    routers_step_end(model)
    assert not torch.equal(before, model[0].router.selection_bias)
    assert model[0].router.load_counts.sum() == 0


def test_auxfree_counts_no_load_for_non_finite_tokens_and_forgets_a_skipped_step():
    """A NaN token's top-k is arbitrary (always the same experts): it was counted as load, and the
    bias moved after steps the optimiser skipped for non-finite gradients."""
    model = nn.Sequential(build_moe(nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 16)), "auxfree", 4, 2))
    router = model[0].router
    model.train()
    x = torch.randn(8, 16)
    x[3] = float("nan")
    model(x)
    assert router.load_counts.sum() == 7 * 2  # the 7 finite tokens' 2 slots each
    before = router.selection_bias.clone()
    routers_step_end(model, step_applied=False)
    assert torch.equal(router.selection_bias, before) and router.load_counts.sum() == 0
    model(x)
    routers_step_end(model)
    assert not torch.equal(router.selection_bias, before) and router.load_counts.sum() == 0


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_auxfree_state_stays_fp32_when_the_model_is_cast(cast):
    """In bf16 a bias at 0.6 cannot move by 1e-3 (its spacing there is 2**-8): the state stays fp32."""
    layer = cast(build_moe(nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 16)), "auxfree", 4, 1, seed=0))
    router = layer.router
    assert router.gate.weight.dtype != torch.float32  # the cast did reach the router's parameters
    assert router.selection_bias.dtype == torch.float32 and router.load_counts.dtype == torch.int64
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([0.6, 0.55, -0.6, -0.6]))
        router.gate.weight.zero_()
    router.train()
    x = torch.randn(3000, 16, dtype=router.gate.weight.dtype)
    route = router(x)
    assert (route.experts == 0).all()  # equal scores: the bias picks expert 0
    assert router.load_counts.tolist() == [3000, 0, 0, 0]  # exact counts (bf16 would hold 3008)
    router.on_step_end()
    expected = torch.tensor([0.6 - 1e-3, 0.55 + 1e-3, -0.6 + 1e-3, -0.6 + 1e-3])
    torch.testing.assert_close(router.selection_bias, expected, rtol=0, atol=1e-7)
    state = router.state_dict()
    assert state["selection_bias"].dtype == torch.float32 and "load_counts" not in state


def test_shared_router_always_uses_the_shared_expert():
    router = make_router("shared", e=4, k=3)
    out = router(torch.randn(6, 16))
    assert (out.experts[:, -1] == 3).all() and (out.experts[:, :-1] < 3).all()
    torch.testing.assert_close(out.weights[:, -1], torch.full((6,), 0.5))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(6))


def test_tcmoe_negative_and_null_slots():
    router = make_router("tcmoe", e=2, k=1)
    assert router.num_slots == 2 * 2 + 1
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]))  # negative slot of expert 0
    out = router(torch.randn(3, 16))
    assert (out.experts == 2).all() and (out.weights < 0).all()
    assert (router.ffn_ids(out.experts) == 0).all()
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0]))  # the null slot
    out = router(torch.randn(3, 16))
    assert (router.ffn_ids(out.experts) == -1).all()
    assert out.aux_terms["null"].item() < -0.9


def test_moepp_zero_and_constant_experts():
    dense = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    layer = build_moe(dense, "moepp", num_experts=2, top_k=1)
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 100.0  # zero expert (slot E)
    y = layer(torch.cat([x[:, :1].abs() + 1, x[:, 1:]], -1))
    assert (layer.last_routing.experts == 2).all()
    torch.testing.assert_close(y, torch.zeros_like(y))
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[3, 0] = 100.0  # constant expert (slot E+1): a0 * x + a1 * v
    x = torch.cat([x[:, :1].abs() + 1, x[:, 1:]], -1)
    y = layer(x)
    alpha = torch.softmax(x @ layer.router.constant_gate.weight.t(), -1)
    torch.testing.assert_close(y, alpha[:, :1] * x + alpha[:, 1:] * layer.router.constant_vector)
    with pytest.raises(ValueError, match="in_features == out_features"):
        build_moe(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)), "moepp")
    assert get_router_class("moepp")(16, 4, 2, copy_expert=True).num_slots == 7


def test_every_alias_is_listed():
    assert set(LIBMOE_NAMES) - {"smoe", "xmoe"} <= set(ROUTER_ALIASES)
