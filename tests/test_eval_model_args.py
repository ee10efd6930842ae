"""The --model_args contract: what libmoe eval writes is what the model class reads back."""

import importlib.util

import pytest

from libmoe_core.evaluation.model_args import format_model_args, parse_bool, parse_int_list, parse_placements

needs_lmms_eval = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")


def test_plain_checkpoint():
    assert format_model_args("/ckpt/a") == "pretrained=/ckpt/a"


def test_recording_options_are_written_only_when_recording():
    assert format_model_args("c", layers=[1, 2], placements=["llm"]) == "pretrained=c"
    text = format_model_args("c", conv_template="phi35", return_id_experts=True, layers=[1, 2, 3],
                             placements=["vision", "llm"], trace_dir="/out/traces")
    assert text == ("pretrained=c,conv_template=phi35,return_id_experts=True,"
                    "layers_expert_selection=1;2;3,placements=vision;llm,trace_dir=/out/traces")


@needs_lmms_eval
def test_round_trip_through_lmms_eval_parser():
    from lmms_eval.utils import simple_parse_args_string

    text = format_model_args("/ck", return_id_experts=True, layers=[4, 0], placements=["projector"],
                             trace_dir="/o/traces", extra={"max_new_tokens": 8})
    kwargs = simple_parse_args_string(text)
    assert kwargs["pretrained"] == "/ck" and kwargs["max_new_tokens"] == 8
    assert parse_bool(kwargs["return_id_experts"]) is True
    assert parse_int_list(kwargs["layers_expert_selection"]) == [4, 0]
    assert parse_placements(kwargs["placements"]) == ("projector",)
    single = simple_parse_args_string(format_model_args("c", return_id_experts=True, layers=[7]))
    assert single["layers_expert_selection"] == 7 and parse_int_list(single["layers_expert_selection"]) == [7]


def test_values_lmms_eval_cannot_carry_are_refused():
    with pytest.raises(ValueError, match="pretrained"):
        format_model_args("/ckpt/a,b")
    with pytest.raises(ValueError, match="set twice"):
        format_model_args("c", extra={"pretrained": "d"})


def test_parsers():
    assert parse_int_list(None) is None and parse_int_list("all") is None
    assert parse_int_list("1 2;3") == [1, 2, 3] and parse_int_list([5]) == [5] and parse_int_list(2.0) == [2]
    with pytest.raises(ValueError, match="integers"):
        parse_int_list("a;b")
    assert parse_placements(None) == ("vision", "projector", "llm")
    assert parse_placements("llm,vision,llm") == ("llm", "vision")
    with pytest.raises(ValueError, match="decoder"):
        parse_placements("decoder")
    assert parse_bool("False") is False and parse_bool(1) is True
    with pytest.raises(ValueError):
        parse_bool("maybe")
