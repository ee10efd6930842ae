"""Conversation templates against the official chat templates (via apply_chat_template)."""

import pytest

from libmoe_core.data.templates import available_templates, get_template
from libmoe_core.data.tiny_tokenizer import build_tiny_tokenizer
from libmoe_core.tokens import IGNORE_INDEX

# Official Jinja chat templates, as shipped in the models' tokenizer_config.json.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + "
    "'<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
    "{{ eos_token }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# name -> (official template, bos token the model's tokenizer uses, end-of-turn token)
OFFICIAL = {
    "phi3": (PHI3, "<s>", "<|end|>"),
    "phi35": (PHI35, "<s>", "<|end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": (QWEN2, None, "<|im_end|>"),
    "chatml": (CHATML, None, "<|im_end|>"),
}

CONVERSATIONS = [
    # 665K style: "<image>\n" first, multi-turn
    [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "The shape is blue."},
     {"from": "human", "value": "And what shape is it?"}, {"from": "gpt", "value": "a rectangle"}],
    # 558K style: "<image>" after the text
    [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "a red circle"}],
    # text-only ShareGPT record with a system turn and edge whitespace
    [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Is there a dog? "},
     {"from": "gpt", "value": " No. "}],
    # two images interleaved with the text: placeholders stay where they are
    [{"from": "human", "value": "Is <image> the same shape as <image>?"}, {"from": "gpt", "value": "no"}],
    # empty system message (Phi-3.5 drops it, Phi-3 keeps it)
    [{"from": "system", "value": ""}, {"from": "human", "value": "hello"}, {"from": "gpt", "value": "Yes."}],
]


def llava_multimodal(value):
    """LLaVA's preprocess_multimodal for a turn with one <image>, written out as the oracle: the
    placeholder removed, the text stripped, then "<image>\n" in front."""
    if value.count("<image>") == 1:
        value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
    return value


def as_messages(conv):
    """The messages the official template gets: user turns placed as LLaVA places them."""
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": llava_multimodal(t["value"]) if t["from"] == "human" else t["value"]}
            for t in conv]


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def style(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizers_by_name(style):
    out = {}
    for name, (jinja, bos, _) in OFFICIAL.items():
        tok = build_tiny_tokenizer(style, chat_template=jinja)
        if bos is not None:
            tok.bos_token = bos
        out[name] = tok
    return out


def label_runs(ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("conv_index", range(len(CONVERSATIONS)))
def test_render_matches_apply_chat_template(tokenizers_by_name, name, conv_index):
    tok = tokenizers_by_name[name]
    conv = CONVERSATIONS[conv_index]
    tpl = get_template(name)
    expected_text = tok.apply_chat_template(as_messages(conv), tokenize=False)
    assert tpl.render_text(conv, tok) == expected_text
    expected_ids = tok.apply_chat_template(as_messages(conv), tokenize=True, return_dict=False)
    ids, labels = tpl.render(conv, tok)
    assert ids == expected_ids
    assert len(labels) == len(ids)
    # one labelled run per assistant turn, decoding to the answer plus the end-of-turn token
    eot = OFFICIAL[name][2]
    answers = [t["value"].strip() if name == "llama3" else t["value"] for t in conv if t["from"] == "gpt"]
    runs = label_runs(ids, labels)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == tok.convert_tokens_to_ids(eot)
        assert tok.decode(run[:-1]).strip() == answer.strip()
    # nothing from the prompt side is labelled: the image token and user text never are
    image_id = tok.convert_tokens_to_ids("<image>")
    assert all(lab != image_id for lab in labels)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_prompt_matches_generation_prompt(tokenizers_by_name, name):
    tok = tokenizers_by_name[name]
    tpl = get_template(name)
    q = "<image>\nWhat shape is in the image?"
    assert tpl.prompt(q) == tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True)
    history = CONVERSATIONS[0][:2]
    msgs = as_messages(history) + [{"role": "user", "content": "Is it big?"}]
    assert tpl.prompt("Is it big?", history) == tok.apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=True)
    # the prompt is exactly the rendered text up to the first answer
    full = tpl.render_text(CONVERSATIONS[1], tok)
    prompt = tpl.prompt(CONVERSATIONS[1][0]["value"])
    assert full.startswith(prompt) and full[len(prompt):].startswith(CONVERSATIONS[1][1]["value"])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_a_single_image_goes_first_in_training_and_prompts(name):
    """A 558K-style "text\n<image>" turn trains with the image first, the layout LLaVA trains and the
    generation prompt uses (it trained "text\n<image>" while evaluation prompted "<image>\ntext")."""
    import dataclasses

    from libmoe_core.model.presets import build_processor

    processor = build_processor("tiny", template=name)
    tok, tpl = processor.tokenizer, get_template(name)
    record = CONVERSATIONS[1]
    text = tpl.render_text(record, tok)
    assert "<image>\nDescribe the image briefly." in text and "briefly.\n<image>" not in text
    assert tpl.prompt("Describe the image briefly.\n<image>") == tpl.prompt("<image>\nDescribe the image briefly.")
    # the processor's prompt (placeholder prepended when absent) is the training text's prefix
    assert text.startswith(processor.prompt("Describe the image briefly."))
    # several placeholders stay in place; the layout can be kept as written
    assert "Is <image> the same shape as <image>?" in tpl.render_text(CONVERSATIONS[3], tok)
    as_written = dataclasses.replace(tpl, move_image_first=False)
    assert "briefly.\n<image>" in as_written.render_text(record, tok)


def test_plain_is_image_then_caption(style):
    tok = build_tiny_tokenizer(style)
    tpl = get_template("plain")
    conv = [{"from": "human", "value": "Give a short caption for the image.\n<image>"},
            {"from": "gpt", "value": "a green triangle"}]
    assert tpl.render_text(conv, tok) == "<image>a green triangle\n"
    ids, labels = tpl.render(conv, tok)
    assert ids == tok("<image>a green triangle\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<image>") and labels[0] == IGNORE_INDEX
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "a green triangle\n"
    assert tpl.prompt("Describe.\n<image>") == "<image>"
    with pytest.raises(ValueError, match="one human and one gpt"):
        tpl.render(CONVERSATIONS[0], tok)


def test_render_rejects_bad_conversations():
    tok = build_tiny_tokenizer()
    tpl = get_template("qwen2")
    with pytest.raises(ValueError, match="turn 1"):
        tpl.render([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], tok)
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tpl.render([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], tok)
    with pytest.raises(ValueError, match="end with an assistant"):
        tpl.render([{"from": "human", "value": "a"}], tok)


def test_get_template_unknown_lists_names():
    assert available_templates() == ["chatml", "llama3", "phi3", "phi35", "plain", "qwen2"]
    with pytest.raises(ValueError) as e:
        get_template("vicuna")
    for name in available_templates():
        assert name in str(e.value)


# -- added tokens that strip whitespace (real Phi-3 / Phi-3.5 tokenizers) -------------------------------------------
# microsoft/Phi-3-mini-*-instruct and Phi-3.5-mini-instruct register these four with "rstrip": true in tokenizer.json,
# so a fast tokenizer's offset for <|end|> also covers the "\n" turn separator after it.
PHI3_RSTRIP_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def strip_flagged_tokenizer(style, names, *, rstrip, lstrip=False, chat_template=None, bos="<s>", eos="</s>"):
    """The kit's tiny tokenizer with ``rstrip``/``lstrip`` set on the added tokens ``names`` (as a hub
    tokenizer.json sets them)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(build_tiny_tokenizer(style).backend_tokenizer.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in names:
            added["rstrip"], added["lstrip"] = rstrip, lstrip
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                  bos_token=bos, eos_token=eos, pad_token="<pad>")
    tok.chat_template = chat_template
    for name in names:  # the flags took
        added = tok.added_tokens_decoder[tok.convert_tokens_to_ids(name)]
        assert (added.rstrip, added.lstrip) == (rstrip, lstrip)
    return tok


def labelled_texts(tok, ids, labels):
    return [tok.decode(run) for run in label_runs(ids, labels)]


# hand-written: each assistant turn's labelled tokens, decoded. The leading space of " No. " is stripped into the
# prompt's <|assistant|> token (rstrip), so it is not part of the answer's tokens.
PHI3_EXPECTED_LABELLED = [
    ["The shape is blue.<|end|>", "a rectangle<|end|>"],
    ["a red circle<|end|>"],
    ["No. <|end|>"],
    ["no<|end|>"],
    ["Yes.<|end|>"],
]


@pytest.mark.parametrize("name", ["phi3", "phi35"])
@pytest.mark.parametrize("conv_index", range(len(CONVERSATIONS)))
def test_phi3_rstrip_end_of_turn_is_labelled(style, name, conv_index):
    """With Phi-3's rstrip flags, every answer's <|end|> is labelled (the model learns to stop)."""
    jinja, bos, _ = OFFICIAL[name]
    tok = strip_flagged_tokenizer(style, PHI3_RSTRIP_TOKENS, rstrip=True, chat_template=jinja, bos=bos,
                                  eos="<|endoftext|>")
    # the case under test: <|end|>'s offset reaches over the "\n" after it
    assert tok("a<|end|>\nb", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][1] == (1, 9)
    conv = CONVERSATIONS[conv_index]
    tpl = get_template(name)
    ids, labels = tpl.render(conv, tok)
    assert ids == tok.apply_chat_template(as_messages(conv), tokenize=True, return_dict=False)
    assert labelled_texts(tok, ids, labels) == PHI3_EXPECTED_LABELLED[conv_index]
    end = tok.convert_tokens_to_ids("<|end|>")
    n_answers = sum(t["from"] == "gpt" for t in conv)
    assert sum(1 for i, lab in zip(ids, labels) if i == end and lab != IGNORE_INDEX) == n_answers
    assert labels[-1] == IGNORE_INDEX and ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>")


# conversations without edge whitespace in the answers, plus an all-whitespace answer
STRIP_CONVERSATIONS = [
    CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[3], CONVERSATIONS[4],
    [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}],
]
# hand-written answers (before the end-of-turn token) their labelled tokens decode to; the all-whitespace
# answer's spaces are stripped into the end-of-turn token (lstrip)
STRIP_EXPECTED_ANSWERS = [["The shape is blue.", "a rectangle"], ["a red circle"], ["no"], ["Yes."], [""]]


@pytest.mark.parametrize(("rstrip", "lstrip"), [(True, True), (False, True)])
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_labels_with_whitespace_stripping_template_tokens(style, name, rstrip, lstrip):
    """Every template special token stripping whitespace on its right and/or left: ids still equal
    apply_chat_template, and each answer's labels are exactly the answer and its end-of-turn token."""
    from libmoe_core.data.tiny_tokenizer import TEMPLATE_SPECIAL_TOKENS

    jinja, bos, eot = OFFICIAL[name]
    tok = strip_flagged_tokenizer(style, TEMPLATE_SPECIAL_TOKENS, rstrip=rstrip, lstrip=lstrip, chat_template=jinja,
                                  bos=bos or "<s>", eos="<|endoftext|>" if name.startswith("phi3") else "</s>")
    tpl = get_template(name)
    for conv, answers in zip(STRIP_CONVERSATIONS, STRIP_EXPECTED_ANSWERS):
        ids, labels = tpl.render(conv, tok)
        assert ids == tok.apply_chat_template(as_messages(conv), tokenize=True, return_dict=False)
        assert labelled_texts(tok, ids, labels) == [answer + eot for answer in answers], conv
    # plain (pretraining) format with the same tokenizer
    plain = [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "a green triangle"}]
    ids, labels = get_template("plain").render(plain, tok)
    assert labelled_texts(tok, ids, labels) == ["a green triangle\n"]
