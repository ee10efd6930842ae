"""Every router against its formula in routers.md, recomputed token by token.

The references use plain per-token float arithmetic (no library helper, no torch op on the
router's path), so a wrong softmax / sigmoid, temperature, norm offset, bias, renormalisation,
slot sign or aux-term composition fails here even where the dispatch oracle (which reuses the
router) cannot see it.
"""

import math

import pytest
import torch

from libmoe_core.moe import get_router_class

T, D, E = 12, 16, 6
DEFAULT_BALANCE, DEFAULT_Z, AUXFREE_BALANCE, TCMOE_NULL = 0.01, 0.001, 1e-4, 1e-5


def tokens(seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def make(name, k, **kw):
    return get_router_class(name)(D, E, k, seed=5, **kw)


def randomise_(*params, std=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- plain per-token arithmetic


def rows(t):
    return t.detach().double().tolist()


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def norm(a):
    return math.sqrt(dot(a, a))


def softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def sigmoid(a):
    return 1.0 / (1.0 + math.exp(-a))


def top(values, k):
    """Indices of the k largest values, largest first."""
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def balance(probs, chosen, n):
    """E * sum_e f_e * P_e; f_e over all T*k slots (ids outside [0, n) count only in the total)."""
    slots = [e for row in chosen for e in row]
    f = [sum(1 for e in slots if e == j) / len(slots) for j in range(n)]
    p = [sum(row[j] for row in probs) / len(probs) for j in range(n)]
    return n * dot(f, p)


def z_loss(logits):
    return sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)


def linear(weight_rows, x, bias=None):
    return [dot(w, x) + (0.0 if bias is None else b) for w, b in zip(weight_rows, bias or [None] * len(weight_rows), strict=True)]


def assert_routes(out, experts, weights, probs=None, logits=None, aux=None, aux_loss=None):
    assert out.experts.tolist() == experts
    close = dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.weights.double(), torch.tensor(weights, dtype=torch.float64), **close)
    if probs is not None:
        torch.testing.assert_close(out.probs.double(), torch.tensor(probs, dtype=torch.float64), **close)
    if logits is not None:
        torch.testing.assert_close(out.logits.double(), torch.tensor(logits, dtype=torch.float64), **close)
    for name, value in (aux or {}).items():
        assert out.aux_terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name
    if aux_loss is not None:
        assert out.aux_loss.item() == pytest.approx(aux_loss, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------- the seed's five


@pytest.mark.parametrize("normalize", [True, False])
def test_smoe_softmax_top_k_renormalised_or_raw(normalize):
    r, x, k = make("smoe", 2, normalize=normalize), tokens(), 2
    randomise_(r.gate.weight, std=0.5)
    logits = [linear(rows(r.gate.weight), xi) for xi in rows(x)]
    probs = [softmax(v) for v in logits]
    chosen = [top(p, k) for p in probs]
    weights = [[p[i] / (sum(p[j] for j in c) if normalize else 1.0) for i in c] for p, c in zip(probs, chosen)]
    bal, z = balance(probs, chosen, E), z_loss(logits)
    assert_routes(r(x), chosen, weights, probs, logits, {"balance": bal, "z": z}, DEFAULT_BALANCE * bal + DEFAULT_Z * z)


def test_sigmoid_scores_top_k_over_the_chosen_sum():
    r, x, k = make("sigmoid", 3), tokens(), 3
    randomise_(r.gate.weight, r.gate.bias, std=0.5)
    logits = [linear(rows(r.gate.weight), xi, rows(r.gate.bias)) for xi in rows(x)]
    scores = [[sigmoid(v) for v in row] for row in logits]
    chosen = [top(s, k) for s in scores]
    weights = [[s[i] / sum(s[j] for j in c) for i in c] for s, c in zip(scores, chosen)]
    probs = [[v / sum(s) for v in s] for s in scores]  # documented: s normalised over all experts
    bal, z = balance(probs, chosen, E), z_loss(logits)
    assert_routes(r(x), chosen, weights, probs, logits, {"balance": bal, "z": z}, DEFAULT_BALANCE * bal + DEFAULT_Z * z)


@pytest.mark.parametrize("name, theta", [("cosine", 0.0), ("perturbed_cosine", 0.1)])
def test_cosine_routers_biased_selection_softmax_over_the_chosen(name, theta):
    r, x, k = make(name, 2), tokens() * 0.05, 2  # small |x|: theta = 0.1 matters
    randomise_(r.gate.weight, std=0.05)
    randomise_(r.selection_bias, std=0.15, seed=2)
    w = rows(r.gate.weight)
    logits = [[dot(we, xi) / ((norm(we) + theta) * (norm(xi) + theta)) for we in w] for xi in rows(x)]
    probs = [softmax(c) for c in logits]
    b = rows(r.selection_bias)
    chosen = [top([pi + bi for pi, bi in zip(p, b)], k) for p in probs]
    assert chosen != [top(p, k) for p in probs], "the bias should change some selections in this test"
    weights = [softmax([p[i] + b[i] for i in c]) for p, c in zip(probs, chosen)]
    bal, z = balance(probs, chosen, E), z_loss(logits)
    assert_routes(r(x), chosen, weights, probs, logits, {"balance": bal, "z": z}, DEFAULT_BALANCE * bal + DEFAULT_Z * z)


def test_hyper_generated_gate_and_bias_softmax_over_the_chosen_logits():
    r, x = make("hyper", 3, k_min=1), tokens()
    l1, l2 = r.hypernet[0], r.hypernet[2]
    randomise_(l1.bias, l2.bias, std=0.02)
    emb = rows(r.embedding)
    hidden = [max(v, 0.0) for v in linear(rows(l1.weight), emb, rows(l1.bias))]
    generated = linear(rows(l2.weight), hidden, rows(l2.bias))
    gate, bias = [generated[e * D : (e + 1) * D] for e in range(E)], generated[E * D :]
    assert max(abs(v) for v in bias) > 1e-3  # the generated bias is not negligible here
    logits = [linear(gate, xi, bias) for xi in rows(x)]
    for mode, k in (("eval", 3), ("train", 2)):  # eval: the configured k; train at t/T = 1/2: k(t) = round(2 * 0.5) + 1
        r.train(mode == "train")
        r.set_step(5, 10)
        chosen = [top(v, k) for v in logits]
        weights = [softmax([v[i] for i in c]) for v, c in zip(logits, chosen)]
        probs = [softmax(v) for v in logits]
        assert_routes(r(x), chosen, weights, probs, logits, {"balance": balance(probs, chosen, E), "z": z_loss(logits)})


# ---------------------------------------------------------------- LibMoE v2's


def test_xmoe_low_dim_cosine_over_temperature():
    r, x, k = make("xmoe", 2), tokens(), 2
    assert r.proj.weight.shape == (E // 2, D)
    randomise_(r.proj.weight, std=0.3)
    emb = [[v / norm(e) for v in e] for e in rows(r.expert_embeddings)]
    logits = []
    for xi in rows(x):
        h = linear(rows(r.proj.weight), xi)
        logits.append([dot([v / norm(h) for v in h], e) / 0.3 for e in emb])
    probs = [softmax(v) for v in logits]
    chosen = [top(p, k) for p in probs]
    weights = [[p[i] / sum(p[j] for j in c) for i in c] for p, c in zip(probs, chosen)]
    assert_routes(r(x), chosen, weights, probs, logits, {"balance": balance(probs, chosen, E), "z": z_loss(logits)})


@pytest.mark.parametrize("name, shared_gate, normalize", [("shared", "half", True), ("shared_sigmoid", "half", True),
                                                      ("shared", "sigmoid", True), ("shared", "half", False),
                                                      ("shared_sigmoid", "half", False)])
def test_shared_expert_routers(name, shared_gate, normalize):
    """half (LibMoE): 0.5 shared + 0.5 routed; sigmoid (Qwen2-MoE): sigmoid(g.x) shared + routed.
    ``normalize=False``: the routed experts' own scores, not renormalised over the chosen (was
    ignored by shared_sigmoid)."""
    r, x, k = make(name, 3, shared_gate=shared_gate, normalize=normalize), tokens(), 3
    assert r.preserves_dense_output == (shared_gate == "half" and normalize)
    randomise_(r.gate.weight, std=0.5)
    bias = None
    if name == "shared_sigmoid":
        randomise_(r.gate.bias, std=0.5, seed=2)
        bias = rows(r.gate.bias)
    routed_logits = [linear(rows(r.gate.weight), xi, bias) for xi in rows(x)]  # [T, E-1]
    if name == "shared":
        scores = [softmax(v) for v in routed_logits]
        routed_probs = scores
    else:
        scores = [[sigmoid(v) for v in row] for row in routed_logits]
        routed_probs = [[v / sum(s) for v in s] for s in scores]
    chosen = [top(s, k - 1) for s in scores]
    if normalize:
        renormalised = [[s[i] / sum(s[j] for j in c) for i in c] for s, c in zip(scores, chosen)]
    else:
        renormalised = [[s[i] for i in c] for s, c in zip(scores, chosen)]
    if shared_gate == "half":
        weights = [[0.5 * w for w in ws] + [0.5] for ws in renormalised]
        probs = [[0.5 * v for v in p] + [0.5] for p in routed_probs]
        logits = routed_logits
    else:
        randomise_(r.shared_gate.weight, std=0.5, seed=3)
        g = [linear(rows(r.shared_gate.weight), xi) for xi in rows(x)]  # [T, 1]
        weights = [ws + [sigmoid(gi[0])] for ws, gi in zip(renormalised, g)]
        probs = [p + [0.0] for p in routed_probs]
        logits = [row + gi for row, gi in zip(routed_logits, g)]
    # documented: balance and z-loss over the routed experts only (the shared one is always on)
    aux = {"balance": balance(routed_probs, chosen, E - 1), "z": z_loss(routed_logits)}
    assert_routes(r(x), [c + [E - 1] for c in chosen], weights, probs, logits, aux)


def test_tcmoe_ternary_slots_signs_and_null_reward():
    k = 2
    r, x = make("tcmoe", k), tokens()
    bias0 = r.gate.bias.tolist()
    assert bias0 == [0.0] * E + [-1.0] * E + [-10.0] * k  # positive, negative (-1), null (-10) slots
    randomise_(r.gate.weight, std=0.5)
    randomise_(r.gate.bias, std=1.0, seed=3)
    with torch.no_grad():
        r.gate.bias[2 * E :] += 1.5  # so some tokens pick a null slot
    logits = [linear(rows(r.gate.weight), xi, rows(r.gate.bias)) for xi in rows(x)]
    probs = [softmax(v) for v in logits]
    chosen = [top(p, k) for p in probs]
    kinds = {"positive": range(E), "negative": range(E, 2 * E), "null": range(2 * E, 2 * E + k)}
    assert all(any(i in kinds[kind] for c in chosen for i in c) for kind in kinds), chosen
    sign = [1.0] * E + [-1.0] * E + [0.0] * k
    weights = [[sign[i] * p[i] / sum(p[j] for j in c) for i in c] for p, c in zip(probs, chosen)]
    folded = [[p[e] + p[E + e] for e in range(E)] for p in probs]  # +f_e and -f_e are one expert
    ffn = [[i % E if i < 2 * E else -1 for i in c] for c in chosen]
    bal, z = balance(folded, ffn, E), z_loss(logits)
    null = -sum(sum(p[2 * E :]) for p in probs) / T
    out = r(x)
    assert_routes(out, chosen, weights, probs, logits, {"balance": bal, "z": z, "null": null},
                  DEFAULT_BALANCE * bal + DEFAULT_Z * z + TCMOE_NULL * null)
    assert r.ffn_ids(out.experts).tolist() == ffn


def test_moepp_zero_constant_and_copy_experts():
    k = 2
    r, x = make("moepp", k, copy_expert=True), tokens()
    zero, constant, copy = E, E + 1, E + 2
    randomise_(r.gate.weight, std=0.6)
    randomise_(r.constant_gate.weight, r.constant_vector, std=0.5, seed=4)
    logits = [linear(rows(r.gate.weight), xi) for xi in rows(x)]  # [T, E+3]
    probs = [softmax(v) for v in logits]
    chosen = [top(p, k) for p in probs]
    assert all(any(s in c for c in chosen) for s in (zero, constant, copy)), chosen
    weights = [[p[i] / sum(p[j] for j in c) for i in c] for p, c in zip(probs, chosen)]
    out = r(x)
    assert_routes(out, chosen, weights, probs, logits, {"balance": balance(probs, chosen, E + 3), "z": z_loss(logits)})
    v = rows(r.constant_vector)
    expected = []
    for xi, c, w in zip(rows(x), chosen, weights, strict=True):
        a = softmax(linear(rows(r.constant_gate.weight), xi))
        y = [0.0] * D
        for slot, wi in zip(c, w, strict=True):
            if slot == constant:
                y = [yj + wi * (a[0] * xj + a[1] * vj) for yj, xj, vj in zip(y, xi, v, strict=True)]
            elif slot == copy:
                y = [yj + wi * xj for yj, xj in zip(y, xi, strict=True)]
        expected.append(y)  # the zero expert and the feed-forward experts add nothing here
    torch.testing.assert_close(r.extra_output(x, out).double(), torch.tensor(expected, dtype=torch.float64), atol=2e-6, rtol=1e-5)
    assert r.ffn_ids(out.experts).tolist() == [[i if i < E else -1 for i in c] for c in chosen]


# ---------------------------------------------------------------- beyond LibMoE


def test_auxfree_biased_selection_unbiased_weights_and_load_from_training_only():
    k = 2
    r, x = make("auxfree", k), tokens()
    randomise_(r.gate.weight, std=0.5)
    randomise_(r.selection_bias, std=0.4, seed=2)
    logits = [linear(rows(r.gate.weight), xi) for xi in rows(x)]
    scores = [[sigmoid(v) for v in row] for row in logits]
    b = rows(r.selection_bias)
    chosen = [top([si + bi for si, bi in zip(s, b)], k) for s in scores]
    assert chosen != [top(s, k) for s in scores], "the bias should change some selections in this test"
    weights = [[s[i] / sum(s[j] for j in c) for i in c] for s, c in zip(scores, chosen)]  # s alone, not s + b
    probs = [[v / sum(s) for v in s] for s in scores]
    bal, z = balance(probs, chosen, E), z_loss(logits)
    r.eval()
    assert_routes(r(x), chosen, weights, probs, logits, {"balance": bal, "z": z}, AUXFREE_BALANCE * bal + DEFAULT_Z * z)
    assert r.load_counts.tolist() == [0] * E  # evaluation is not load
    r.train()
    r(x)
    assert r.load_counts.tolist() == [sum(c.count(e) for c in chosen) for e in range(E)]


def test_every_built_in_router_is_covered_here():
    from libmoe_core.moe import ROUTERS

    built_in = {name for name, cls in ROUTERS.items() if cls.__module__ == "libmoe_core.moe.routers"}
    covered = {"smoe", "sigmoid", "cosine", "perturbed_cosine", "hyper", "xmoe", "shared", "shared_sigmoid", "tcmoe",
               "moepp", "auxfree"}
    assert built_in == covered, "a new router needs its formula test here"
