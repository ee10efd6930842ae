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
