"""Router options: checked against the router they go to, named in errors; placement overrides."""

import pytest
import torch

from libmoe_core.model.presets import build_model
from libmoe_core.moe import Router, check_router_options, register_router
from libmoe_core.moe.router_base import ROUTERS, router_option_names
from libmoe_core.train.config import resolve_config


def test_option_names_follow_the_kw_chain():
    assert router_option_names(ROUTERS["xmoe"]) == ["balance_coef", "init_std", "routing_dim", "temperature",
                                                    "z_coef"]
    assert router_option_names(ROUTERS["hyper"]) == ["balance_coef", "init_std", "k_max", "k_min", "z_coef"]

    class Closed(Router):  # no **kw: the base's options are not reachable
        def __init__(self, hidden_size, num_experts, top_k, *, width: int = 2, seed=None):
            super().__init__(hidden_size, num_experts, top_k, seed=seed)

    assert router_option_names(Closed) == ["width"]


def test_an_unknown_option_names_the_router_and_its_options():
    with pytest.raises(ValueError, match=r"router_options: router 'cosine' takes no option\(s\) \['temprature'\]; "
                                         r"its options: \['balance_coef', 'init_std', 'z_coef'\]"):
        check_router_options("cosine", {"temprature": 0.5})
    with pytest.raises(ValueError, match="moe_vision router_options: router 'xmoe' takes no option"):
        build_model("tiny", router="xmoe", router_options={"temprature": 0.5}, moe_vision=True)
    with pytest.raises(ValueError, match="unknown router 'cosin'"):
        check_router_options("cosin", {})


def test_a_placement_with_another_router_does_not_inherit_the_options(tmp_path):
    # was: smoe got xmoe's temperature (TypeError: unexpected keyword argument 'temperature')
    model = build_model("tiny", router="xmoe", router_options={"temperature": 0.5}, moe_vision=True,
                        moe_llm_layers={"layers": [1], "router": "smoe"})
    assert model.config.moe["vision"]["router_options"] == {"temperature": 0.5}
    assert model.config.moe["llm"]["router"] == "smoe" and model.config.moe["llm"]["router_options"] == {}
    # the same router inherits them; a placement's own options replace them
    same = build_model("tiny", router="xmoe", router_options={"temperature": 0.5}, moe_vision=False,
                       moe_llm_layers={"layers": [1], "top_k": 1})
    assert same.config.moe["llm"]["router_options"] == {"temperature": 0.5}
    own = build_model("tiny", router="xmoe", router_options={"temperature": 0.5}, moe_vision=False,
                      moe_llm_layers={"layers": [1], "router": "smoe", "router_options": {"normalize": False}})
    assert own.config.moe["llm"]["router_options"] == {"normalize": False}
    own.save_pretrained(tmp_path)
    loaded = type(own).from_pretrained(tmp_path)
    assert loaded.config.moe == own.config.moe
    ids = torch.tensor([[5, 6, 7, 8]])  # text only (id 2 is <image>)
    torch.testing.assert_close(loaded(input_ids=ids).logits, own.eval()(input_ids=ids).logits)


def test_a_plugin_routers_own_options_are_accepted():
    name = "test_options_plugin"
    if name not in ROUTERS:
        @register_router(name)
        class Plugin(ROUTERS["smoe"]):
            def __init__(self, hidden_size, num_experts, top_k, *, sharpness: float = 1.0, **kw):
                super().__init__(hidden_size, num_experts, top_k, **kw)
                self.sharpness = sharpness

    check_router_options(name, {"sharpness": 2.0, "normalize": False, "balance_coef": 0.1})
    model = build_model("tiny", router=name, router_options={"sharpness": 2.0}, moe_vision=True)
    assert model.config.moe["vision"]["router_options"] == {"sharpness": 2.0}


@pytest.mark.parametrize("overrides,message", [
    ({"router_options": {"temprature": 1.0}, "router": "xmoe"}, "^router, router_options: router 'xmoe' takes no option"),
    ({"router_options": {"temperature": 1.0}, "router": "xmoe",
      "moe_llm_layers": {"layers": [1], "router": "smoe", "router_options": {"temperature": 1.0}}},
     "^moe_llm_layers: router 'smoe' takes no option"),
    # the router's own value checks, which failed only when the sft stage built the model
    ({"router": "shared", "top_k": 1}, r"^router, router_options: router 'shared' \(num_experts=4, top_k=1\): .*top_k >= 2"),
    ({"router": "xmoe", "router_options": {"temperature": -1.0}}, "xmoe temperature must be a finite number > 0"),
    ({"router": "hyper", "router_options": {"k_min": 3, "k_max": 2}}, "needs 1 <= k_min <= k_max"),
    ({"router": "shared", "router_options": {"shared_gate": "relu"}}, "shared_gate must be 'half' or 'sigmoid'"),
    ({"router": "smoe", "moe_llm_layers": {"layers": [1], "router": "shared", "top_k": 1}},
     r"^moe_llm_layers: router 'shared' \(num_experts=4, top_k=1\)"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32 - 1\], got -1"),
])
def test_training_configs_are_checked_before_launch(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("sft", overrides=overrides)
    good = dict(overrides, router="xmoe", moe_llm_layers={"layers": [1], "router": "smoe"}, top_k=2, seed=0)
    good["router_options"] = {"temperature": 1.0}
    assert resolve_config("sft", overrides=good).router_options == {"temperature": 1.0}


def test_value_checks_leave_plugin_routers_and_unused_sizes_alone():
    """A plugin router's checks may need the real widths (it was built with hidden size 16 and
    refused); the model-wide sizes were checked although every placement used its own."""
    from libmoe_core.moe import ROUTERS, get_router_class, register_router

    @register_router("test_needs_width")
    class NeedsWidth(get_router_class("smoe")):
        extra_options = ("heads",)

        def __init__(self, hidden_size, num_experts, top_k, *, heads=1, **kw):
            if hidden_size % heads:
                raise ValueError(f"hidden_size {hidden_size} not divisible by heads {heads}")
            super().__init__(hidden_size, num_experts, top_k, **kw)

    try:
        assert resolve_config("sft", overrides={"router": "test_needs_width", "router_options": {"heads": 32}})
    finally:
        ROUTERS.pop("test_needs_width", None)
    own_sizes = {"router": "hyper", "router_options": {"k_min": 2, "k_max": 6}, "moe_vision": False,
                 "moe_llm_layers": {"layers": [1], "num_experts": 8, "top_k": 4}}
    assert resolve_config("sft", overrides=own_sizes).router_options == {"k_min": 2, "k_max": 6}
    with pytest.raises(ValueError, match="k_max=6, num_experts=4"):  # used by the vision placement: checked
        resolve_config("sft", overrides=dict(own_sizes, moe_vision=True))
    with pytest.raises(ValueError, match="k_max=6, num_experts=4"):  # {}: every llm layer, model-wide sizes
        resolve_config("sft", overrides=dict(own_sizes, moe_llm_layers={}))


def test_the_router_check_leaves_the_global_rng_alone():
    import torch

    state = torch.random.get_rng_state()
    resolve_config("sft", overrides={"router": "hyper"})
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_placement_naming_the_same_router_by_an_alias_keeps_the_options():
    model = build_model("tiny", router="hyper", router_options={"k_min": 2}, moe_vision=False,
                        moe_llm_layers={"layers": [1], "router": "hyperrouter"})  # LibMoE's name for hyper
    assert model.config.moe["llm"]["router_options"] == {"k_min": 2}
    resolve_config("sft", overrides={"router": "hyper", "router_options": {"k_min": 2},
                                     "moe_llm_layers": {"layers": [1], "router": "hyperrouter"}})


def test_options_a_router_reads_from_kwargs_are_declared():
    name = "test_kw_options_plugin"
    if name not in ROUTERS:
        @register_router(name)
        class KwPlugin(ROUTERS["smoe"]):
            extra_options = ("sharpness",)

            def __init__(self, hidden_size, num_experts, top_k, **kw):
                self_sharpness = kw.pop("sharpness", 1.0)
                super().__init__(hidden_size, num_experts, top_k, **kw)
                self.sharpness = self_sharpness

    check_router_options(name, {"sharpness": 2.0})
    assert build_model("tiny", router=name, router_options={"sharpness": 2.0},
                       moe_vision=True).config.moe["vision"]["router_options"] == {"sharpness": 2.0}
    with pytest.raises(ValueError, match="lists it in its extra_options"):
        check_router_options(name, {"sharpnes": 2.0})
