"""The `libmoe` lmms-eval model: batch invariance, traces against the model's own routing,
loglikelihood, and a run through the real `python -m lmms_eval` CLI."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")

QUESTIONS = ["What color is the shape?", "Is there a red circle?", "What shape is it?", "Is it blue?", "Name a shape.",
             "Does the image not contain a triangle?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from libmoe_core.model.presets import build_model, build_processor

    torch.manual_seed(0)
    model = build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers=[1, 3])
    with torch.no_grad():  # sharpen the random LM head: greedy answers are not near-ties
        model.language_model.lm_head.weight.mul_(8)
    model.generation_config.eos_token_id = None  # every sample generates max_new_tokens
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    build_processor("tiny").save_pretrained(path)
    return path


def docs():
    rng = np.random.default_rng(0)
    out = []
    for i, q in enumerate(QUESTIONS):
        images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(1 if i % 3 else 2)]
        out.append({"question": q, "images": [] if i == 4 else images})  # doc 4 is text-only
    return out


class Request:
    """The part of lmms-eval's Instance the model reads."""

    def __init__(self, args):
        self.args = args


def make(path, **kwargs):
    from libmoe_core.evaluation.lmms_model import LibMoE

    lm = LibMoE(pretrained=str(path), **kwargs)
    lm.task_dict = {"toy": {"test": docs()}}
    return lm


def gen_requests(max_new_tokens=5):
    kwargs = {"max_new_tokens": max_new_tokens, "until": ["\n\n"], "do_sample": False}
    return [Request((d["question"], dict(kwargs), lambda doc: doc["images"], i, "toy", "test")) for i, d in enumerate(docs())]


def test_batch_size_does_not_change_answers(checkpoint):
    one = make(checkpoint, batch_size=1).generate_until(gen_requests())
    four = make(checkpoint, batch_size=4).generate_until(gen_requests())
    assert one == four
    assert len(one) == len(QUESTIONS) and all(isinstance(a, str) for a in one)
    assert len(set(one)) > 1, "answers are all the same: the check would be vacuous"


def test_traces_match_the_models_own_routing(checkpoint, tmp_path):
    from libmoe_core.analysis.schema import JOIN_KEYS, TRACE_SCHEMA
    from libmoe_core.evaluation.traces import read_traces

    lm = make(checkpoint, batch_size=3, return_id_experts=True, trace_dir=str(tmp_path / "traces"),
              layers_expert_selection="0;3", checkpoint="ckpt-a")
    steps = 4
    lm.generate_until(gen_requests(steps))
    proc, model = lm.processor, lm.model
    lm.clean()  # closes the trace writer (and, as lmms-eval's base class does, drops the model)
    table = read_traces(tmp_path / "traces")
    assert table.schema.equals(TRACE_SCHEMA, check_metadata=False)
    df = table.to_pandas()
    assert set(df["checkpoint"]) == {"ckpt-a"} and set(df["task"]) == {"toy"}
    assert set(zip(df["placement"], df["layer"])) == {("vision", 0), ("projector", 0), ("llm", 3)}

    patches = model.config.patch_grid ** 2
    for doc_id, doc in enumerate(docs()):
        n_images = len(doc["images"])
        prompt = proc.prompt(doc["question"], num_images=n_images)
        prompt_len = len(proc.encode(prompt, n_images))
        rows = df[df["doc_id"] == doc_id]
        counts = rows.groupby(["placement", "token_kind"]).size().to_dict()
        assert counts.get(("vision", "image"), 0) == n_images * patches
        assert counts.get(("projector", "image"), 0) == n_images * model.config.num_image_tokens
        assert counts.get(("llm", "image"), 0) == n_images * model.config.num_image_tokens
        assert counts[("llm", "text")] == prompt_len - n_images * model.config.num_image_tokens
        assert counts[("llm", "generated")] == steps - 1  # the last generated token is never fed back
        # documents with two images: (image, crop) tells their vision/projector rows apart
        assert not rows.duplicated(list(JOIN_KEYS)).any()
        for placement in ("vision", "projector"):
            per_image = rows[rows["placement"] == placement].groupby("image").size().to_dict()
            assert per_image == {i: len(rows[rows["placement"] == placement]) // max(n_images, 1) for i in range(n_images)}
        llm = rows[rows["placement"] == "llm"]
        assert set(llm.loc[llm["token_kind"] != "image", "image"]) == {-1}
        assert sorted(set(llm.loc[llm["token_kind"] == "image", "image"])) == list(range(n_images))
        experts = np.stack(rows["experts"].to_numpy())
        assert ((experts >= 0) & (experts < rows["num_experts"].to_numpy()[:, None])).all()

    # the prompt rows of one document equal the model's own routing for that input alone
    doc = docs()[1]
    inputs = proc([proc.prompt(doc["question"], num_images=1)], [doc["images"]])
    with torch.no_grad():
        model(**inputs)
    own = model.language_model.model.layers[3].mlp.last_routing
    rows = df[(df["doc_id"] == 1) & (df["placement"] == "llm") & (df["token_kind"] != "generated")].sort_values("position")
    assert rows["position"].tolist() == list(range(inputs["input_ids"].shape[1]))
    np.testing.assert_array_equal(np.stack(rows["experts"].to_numpy()), own.experts[0].numpy())
    np.testing.assert_allclose(np.stack(rows["weights"].to_numpy()), own.weights[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack(rows["probs"].to_numpy()), own.probs[0].numpy(), atol=1e-5)


def test_traces_do_not_depend_on_the_batch_when_samples_stop_early(checkpoint, tmp_path):
    """A sample's end token is fed back only while a longer sample of its batch goes on: it is
    never traced, so batch size 1 and 6 trace the same rows."""
    from libmoe_core.evaluation.traces import read_traces

    generated = {}
    for bs in (1, 6):
        lm = make(checkpoint, batch_size=bs, return_id_experts=True, trace_dir=str(tmp_path / f"bs{bs}"),
                  layers_expert_selection="3", placements="llm")
        lm.model.generation_config.eos_token_id = lm.processor.tokenizer("?", add_special_tokens=False)["input_ids"]
        lm.generate_until(gen_requests(6))
        lm.clean()
        df = read_traces(tmp_path / f"bs{bs}").to_pandas()
        generated[bs] = df[df["token_kind"] == "generated"].groupby("doc_id")["position"].apply(sorted).to_dict()
    assert generated[1] == generated[6]
    lengths = [len(generated[1].get(d, [])) for d in range(len(QUESTIONS))]
    assert min(lengths) < max(lengths) == 5, lengths  # some samples stopped early: the check is not vacuous


#: per-document stop strings: rows of one batch stop at different steps, on a stop string (docs 1 and 4: a
#: stop spanning two tokens, a list of two) or on the end token "?" (docs 2, 3, 5), or run on (doc 0)
UNTIL = {0: ["never"], 1: ["--"], 2: ["never"], 3: ["never"], 4: ["zzz", "questio red"], 5: ["yy"]}
LIMIT = 16


def stop_requests(doc_ids, until=UNTIL):
    requests = gen_requests(LIMIT)
    for request in requests:
        request.args[1]["until"] = until[request.args[3]]
    return [requests[d] for d in doc_ids]


def end_at_question_marks(lm):
    lm.model.generation_config.eos_token_id = lm.processor.tokenizer("?", add_special_tokens=False)["input_ids"]
    return lm


def generate_then_cut(lm, requests):
    """The oracle: no early stop. Every row generates LIMIT tokens, then is cut at its stop strings.
    Returns the new tokens [B, LIMIT] and the answers."""
    from libmoe_core.evaluation.lmms_model import _cut, request_stops

    visuals = [lm._visuals(r.args[2], r.args[4], r.args[5], r.args[3]) for r in requests]
    inputs = lm._inputs([lm.processor.prompt(r.args[0], num_images=len(v)) for r, v in zip(requests, visuals)], visuals)
    with torch.no_grad():
        new = lm.model.generate(**inputs, max_new_tokens=LIMIT, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    stops = [request_stops(r.args[1]["until"], lm.stops) for r in requests]
    return new, [_cut(text, s) for text, s in zip(lm.processor.batch_decode(new), stops)]


def first_stop(lm, tokens, until):
    """(step, why): the first step whose token is an end token or completes one of the stop strings."""
    eos = set(lm.model.generation_config.eos_token_id)
    for k in range(1, len(tokens) + 1):
        if tokens[k - 1] in eos:
            return k, "eos"
        if any(u in lm.processor.batch_decode([tokens[:k]])[0] for u in until):
            return k, "stop"
    return len(tokens), "limit"


def test_a_row_stops_only_once_no_stop_can_cut_its_answer_earlier():
    """Stops where one contains another (``["x.Q:", "Q"]``): stopping at the first completed stop
    ("ans x.Q") answered "ans x." where the whole text is cut to "ans". Oracle: :func:`_cut` of the
    whole text, over random texts and stop lists, one character per token."""
    import random

    from libmoe_core.evaluation.lmms_model import StopAtStrings, _cut

    def decode(rows):
        return ["".join(chr(t) for t in row) for row in rows]

    def stopped_text(full, stops):
        criterion = StopAtStrings(decode, [stops], prompt_width=0)
        for n in range(1, len(full) + 1):
            if criterion(torch.tensor([[ord(c) for c in full[:n]]]), None)[0]:
                return full[:n]
        return full

    assert stopped_text("ans x.Q: more", ["x.Q:", "Q"]) == "ans x.Q:"
    rng = random.Random(0)
    stopped_early = 0
    for _ in range(3000):
        full = "".join(rng.choice("abQ:x.") for _ in range(24))
        stops = ["".join(rng.choice("abQ:x.") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = stopped_text(full, stops)
        assert _cut(text, stops) == _cut(full, stops), (full, stops, text)
        stopped_early += len(text) < len(full)
    assert stopped_early > 1000


def test_rows_stop_at_their_own_stop_strings_and_answers_do_not_change(checkpoint):
    """Each row stops at its first end token or stop string; the batch generates no step after its
    last row stopped, and every answer is the one generating LIMIT tokens and cutting gives."""
    lm = end_at_question_marks(make(checkpoint))
    forwards = []
    lm.model.register_forward_hook(lambda *_: forwards.append(1))  # one forward per generated token
    for doc_ids in ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]):
        requests = stop_requests(doc_ids)
        new, expected = generate_then_cut(lm, requests)
        stops = [first_stop(lm, row, UNTIL[d]) for row, d in zip(new.tolist(), doc_ids)]
        forwards.clear()
        assert lm._generate_batch(requests) == expected
        assert len(forwards) == max(step for step, _ in stops), stops
        # not vacuous: rows stop at different steps, on stop strings and end tokens, some cut
        assert len({step for step, _ in stops}) >= 4 and {"stop", "eos"} <= {why for _, why in stops}, stops
        assert any(a != b.strip() for a, b in zip(expected, lm.processor.batch_decode(new)))
    last = max(stops)  # docs 1-5 all stop early, the last one on a stop string
    assert last[1] == "stop" and len(forwards) == last[0] < LIMIT, stops


def test_a_row_ending_on_a_stop_string_traces_only_the_tokens_it_generated(checkpoint, tmp_path):
    """A row that completed a stop string is padded while the batch goes on: its trace is the one it
    had without stop strings (the whole LIMIT steps) up to that token, which is dropped as an end
    token is; the other rows' traces do not change."""
    from libmoe_core.evaluation.traces import read_traces

    doc_ids = [0, 1, 4]  # doc 0 runs to LIMIT: the batch goes on after docs 1 and 4 stopped
    traces = {}
    for name, until in (("stopped", UNTIL), ("oracle", {d: ["never"] for d in UNTIL})):
        lm = end_at_question_marks(make(checkpoint, return_id_experts=True, trace_dir=str(tmp_path / name),
                                        layers_expert_selection="3", placements="llm"))
        lm._generate_batch(stop_requests(doc_ids, until))
        lm.clean()
        traces[name] = read_traces(tmp_path / name).to_pandas().sort_values(["doc_id", "position"], ignore_index=True)
    plain = end_at_question_marks(make(checkpoint))
    new, _ = generate_then_cut(plain, stop_requests(doc_ids))
    oracle, stopped = traces["oracle"], traces["stopped"]
    for d, row in zip(doc_ids, new.tolist()):
        step, why = first_stop(plain, row, UNTIL[d])
        generated = oracle[(oracle["doc_id"] == d) & (oracle["token_kind"] == "generated")]
        assert len(generated) == LIMIT - 1  # without stop strings every row ran to LIMIT
        keep = oracle["doc_id"].eq(d) & oracle["position"].lt(generated["position"].min() + step - 1)
        expected, got = oracle[keep], stopped[stopped["doc_id"] == d]
        assert (why, len(got[got["token_kind"] == "generated"])) == (("limit", LIMIT - 1) if d == 0 else ("stop", step - 1))
        assert got["position"].tolist() == expected["position"].tolist()
        assert got["token_kind"].tolist() == expected["token_kind"].tolist()
        np.testing.assert_array_equal(np.stack(got["experts"].to_numpy()), np.stack(expected["experts"].to_numpy()))
        np.testing.assert_allclose(np.stack(got["weights"].to_numpy()), np.stack(expected["weights"].to_numpy()),
                                   atol=1e-6)


def test_loglikelihood_prefers_the_greedy_answer(checkpoint):
    lm = make(checkpoint)
    doc_id = 1
    (greedy,) = make(checkpoint).generate_until([gen_requests(1)[doc_id]])
    visual = lambda doc: doc["images"]
    scores = lm.loglikelihood([Request((QUESTIONS[doc_id], " " + w, visual, doc_id, "toy", "test"))
                               for w in ("zebra", "quantum")])
    assert all(lp < 0 for lp, _ in scores)
    assert scores[0][0] != scores[1][0]
    # the greedy one-token answer is greedy under loglikelihood too
    token = lm.processor.tokenizer(greedy, add_special_tokens=False)["input_ids"]
    if len(token) == 1:
        ((_, is_greedy),) = lm.loglikelihood([Request((QUESTIONS[doc_id], greedy, visual, doc_id, "toy", "test"))])
        assert is_greedy


def test_loglikelihood_scores_the_continuation_as_training_tokenises_an_answer(checkpoint):
    """A SentencePiece-style tokenizer gives a lone continuation a leading "▁" it has not after the
    prompt: the continuation was tokenised alone. Oracle: the labelled answer tokens of the same
    question and answer rendered for training, scored by the model on the rendered ids."""
    from libmoe_core.data.templates import IGNORE_INDEX
    from libmoe_core.data.tiny_tokenizer import build_tiny_tokenizer
    from libmoe_core.model.processor import LibMoEProcessor

    lm = make(checkpoint)
    old = lm.processor
    sp = build_tiny_tokenizer("metaspace", chat_template=old.tokenizer.chat_template)
    lm.processor = LibMoEProcessor(sp, old.image_processor, template=old.template, num_image_tokens=old.num_image_tokens)
    doc_id, answer = 4, "Yes a circle"  # doc 4 is text-only
    assert sp("Yes", add_special_tokens=False)["input_ids"][0] != sp("\nYes", add_special_tokens=False)["input_ids"][-2]
    ids, labels = lm.processor.render([{"from": "human", "value": QUESTIONS[doc_id]}, {"from": "gpt", "value": answer}])
    answer_pos = [i for i, y in enumerate(labels) if y != IGNORE_INDEX][:-1]  # the answer without its <|end|>
    assert sp.decode([ids[i] for i in answer_pos]) == answer
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids[: answer_pos[-1] + 1]])).logits[0].float().log_softmax(-1)
    expected = sum(logits[i - 1, ids[i]].item() for i in answer_pos)
    ((logprob, _),) = lm.loglikelihood([Request((QUESTIONS[doc_id], answer, lambda doc: doc["images"], doc_id, "toy", "test"))])
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_a_non_finite_loglikelihood_is_an_error_naming_the_document(checkpoint):
    """lmms-eval picks the argmax over a question's choices: a NaN score would be picked silently."""
    lm = make(checkpoint)
    with torch.no_grad():
        lm.model.language_model.lm_head.weight[0, 0] = float("nan")
    request = Request((QUESTIONS[1], " zebra", lambda doc: doc["images"], 1, "toy", "test"))
    with pytest.raises(ValueError, match="toy doc 1's continuation ' zebra' is nan"):
        lm.loglikelihood([request])


def test_generation_limit_is_the_tasks_own(checkpoint, tmp_path):
    """A task's max_new_tokens reaches generate (a default cap of 64 cut MathVista's 16384 and POPE's 128
    silently); a task without one gets lmms-eval's 1024; the model argument caps, logged once per task."""
    from loguru import logger

    seen = []

    def spy(lm):
        def generate(input_ids, **settings):
            seen.append(settings["max_new_tokens"])
            return torch.cat([input_ids, input_ids[:, -2:]], dim=1)  # two "new" tokens

        lm.model.generate = generate
        return lm

    def request(limit):
        kwargs = {"until": ["\n\n"]} | ({} if limit is None else {"max_new_tokens": limit})
        return Request((QUESTIONS[0], kwargs, lambda doc: doc["images"], 0, "toy", "test"))

    spy(make(checkpoint)).generate_until([request(16384)])
    spy(make(checkpoint)).generate_until([request(None)])
    assert seen == [16384, 1024]
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        capped = spy(make(checkpoint, max_new_tokens=50))
        capped.generate_until([request(128)])
        capped.generate_until([request(128)])
        capped.generate_until([request(16)])
    finally:
        logger.remove(sink)
    assert seen[2:] == [50, 50, 16]
    assert len(messages) == 1 and "toy asks for up to 128 new tokens" in messages[0] and "cuts it to 50" in messages[0]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        make(checkpoint, max_new_tokens=0)
    # beams are rows of their own, reordered at every step: routing traces refuse them
    traced = make(checkpoint, return_id_experts=True, trace_dir=str(tmp_path / "t"))
    beams = Request((QUESTIONS[0], {"max_new_tokens": 3, "num_beams": 2}, lambda doc: doc["images"], 0, "toy", "test"))
    with pytest.raises(ValueError, match="routing traces .* need num_beams=1; toy generates with num_beams=2"):
        traced.generate_until([beams])
    traced.clean()


def test_lmms_evals_default_stop_does_not_cut_answers():
    """lmms-eval adds until=["\\n\\n"] to every task that sets none: MathVista's reasoning was cut
    before its final answer."""
    from libmoe_core.evaluation.lmms_model import _cut, request_stops

    answer = "The bars are 12 and 17.\n\nSo the difference is 5.\n\nThe answer is 5.<|end|>junk"
    assert _cut(answer, request_stops(["\n\n"], ["<|end|>"])) == answer.split("<|end|>")[0]
    assert _cut(answer, request_stops("The answer", ["<|end|>"])) == "The bars are 12 and 17.\n\nSo the difference is 5."
    assert request_stops(None, ["<|end|>"]) == ["<|end|>"]


def test_bad_batch_size_and_trace_selections_are_refused(checkpoint, tmp_path):
    """batch_size "abc" ran at 1; a selection of no MoE layer ran to the end with no trace."""
    for bad in ("abc", "0", -2, "auto"):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad!r}"):
            make(checkpoint, batch_size=bad)
    record = dict(return_id_experts=True, trace_dir=str(tmp_path / "t"))
    with pytest.raises(ValueError, match=r"layers_expert_selection \[99\] are no MoE layers .* its MoE layers: "
                                         r"vision 0, vision 1, projector 0, llm 1, llm 3"):
        make(checkpoint, layers_expert_selection="1;99", **record)
    with pytest.raises(ValueError, match=r"layers_expert_selection \[3\] are no MoE layers .* \['vision'\]"):
        make(checkpoint, layers_expert_selection="3", placements="vision", **record)
    model = make(checkpoint, layers_expert_selection="3", placements="llm;projector", **record)  # llm 3 exists
    model.clean()


def test_a_named_placement_without_moe_layers_is_refused(tmp_path):
    from libmoe_core.model.presets import build_model, build_processor

    build_model("tiny", moe_llm_layers=[1]).save_pretrained(tmp_path / "ckpt")
    build_processor("tiny").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"placements \['projector'\] .* have no MoE layers; its MoE layers: llm 1"):
        make(tmp_path / "ckpt", return_id_experts=True, trace_dir=str(tmp_path / "t"), placements="projector,llm")
    make(tmp_path / "ckpt", return_id_experts=True, trace_dir=str(tmp_path / "t2"), placements="all").clean()


def test_unknown_model_argument_and_template(checkpoint):
    with pytest.raises(ValueError, match="unknown model arguments"):
        make(checkpoint, temperature_boost=3)
    with pytest.raises(ValueError, match="no_such_template"):
        make(checkpoint, conv_template="no_such_template")


@pytest.mark.slow
def test_real_lmms_eval_cli_on_easyvqa(checkpoint, tmp_path):
    from libmoe_core.evaluation.local_tasks import prepare_local_tasks

    include = prepare_local_tasks(["easyvqa"], tmp_path / "tasks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "libmoe", "--model_args", f"pretrained={checkpoint}",
         "--tasks", "easyvqa", "--include_path", str(include), "--limit", "8", "--batch_size", "4",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=1200, check=False)
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert results, proc.stdout[-3000:] + proc.stderr[-3000:]
    accuracy = json.loads(results[0].read_text())["results"]["easyvqa"]["exact_match,none"]
    assert 0.0 <= accuracy <= 1.0


def test_drop_top1_ablation_through_the_model_class(tmp_path):
    from libmoe_core.analysis.ablation import drop_top1
    from libmoe_core.model.presets import build_model, build_processor

    torch.manual_seed(0)  # experts must differ for the ablation to change anything
    model = build_model("tiny", moe_vision=True, moe_llm_layers="all", noise=0.5)
    checkpoint = tmp_path / "noisy"
    model.save_pretrained(checkpoint)
    build_processor("tiny").save_pretrained(checkpoint)

    visual = lambda doc: doc["images"]
    requests = [Request((QUESTIONS[i], " circle", visual, i, "toy", "test")) for i in (0, 1, 4)]
    plain = make(checkpoint)
    baseline = plain.loglikelihood(requests)
    ablated = make(checkpoint, drop_top1=True).loglikelihood(requests)
    with drop_top1(plain.model):  # the same ablation applied by hand
        by_hand = plain.loglikelihood(requests)
    assert [a for a, _ in ablated] == pytest.approx([b for b, _ in by_hand], abs=1e-5)
    assert any(abs(a - b) > 1e-4 for (a, _), (b, _) in zip(ablated, baseline))
