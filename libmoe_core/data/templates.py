"""Conversation templates: LLaVA records -> (input_ids, labels) and generation prompts.

A template turns ``[{from: human|gpt|system, value}]`` (or ``{role, content}``) into the
text the official chat template of the language model would produce (for the turns with
their ``<image>`` placed as below), tokenises it in one piece (so ids equal
``tokenizer.apply_chat_template(...)`` of those turns) and keeps labels only on
assistant answers, their end-of-turn token included; everything else is ``IGNORE_INDEX``.

``<image>`` placeholders stay in the text; the tokenizer must know ``<image>`` as one
added special token, and the collator expands it later (:mod:`libmoe_core.tokens`).
A chat template moves a user turn's single placeholder to the turn's start, as LLaVA's
``preprocess_multimodal`` does (``"What is this?\n<image>"`` -> ``"<image>\nWhat is this?"``),
so training text and generation prompts (:meth:`LibMoEProcessor.prompt`) share one layout;
a turn with several placeholders keeps them where they are (interleaved images).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tokens import IGNORE_INDEX, IMAGE_PLACEHOLDER

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def normalize_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """``[{from, value}]`` or ``[{role, content}]`` -> ``[(system|user|assistant, text)]``.

    Checks the order: an optional leading system turn, then user/assistant alternating,
    starting with user. Raises ``ValueError`` naming the turn index otherwise.
    """
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i}: expected an object, got {type(turn).__name__}")  # noqa: TRY004 (bad data, not a bad call)
        raw_role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ValueError(f"turn {i}: unknown role {raw_role!r} (expected human/gpt/system)")
        if not isinstance(text, str):
            raise ValueError(f"turn {i}: 'value' must be a string, got {type(text).__name__}")  # noqa: TRY004
        turns.append((role, text))
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    for j, (role, _) in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            idx = j + (len(turns) - len(body))
            raise ValueError(f"turn {idx}: role {role!r} where {expected!r} was expected (human/gpt alternate)")
    return turns


def image_first(text: str) -> str:
    """LLaVA's placement: a text with exactly one ``<image>`` becomes ``<image>\n`` + the rest, stripped;
    any other text is returned unchanged."""
    if text.count(IMAGE_PLACEHOLDER) != 1:
        return text
    return (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


@dataclass(frozen=True)
class ConversationTemplate:
    """Base class. Subclasses produce ``(text, is_answer)`` segments."""

    name: str

    # -- public API --------------------------------------------------------------
    def render(self, conversations: list[dict], tokenizer) -> tuple[list[int], list[int]]:
        """Tokenised conversation and its labels (``IGNORE_INDEX`` except assistant answers)."""
        segments = self.segments(conversations, tokenizer)
        return tokenize_segments(segments, tokenizer)

    def render_text(self, conversations: list[dict], tokenizer=None) -> str:
        """The full training text (equal to ``apply_chat_template(..., tokenize=False)``)."""
        return "".join(text for text, _ in self.segments(conversations, tokenizer))

    def prompt(self, question: str, history: list[dict] | None = None) -> str:
        """Generation prompt for one user turn; ends where the assistant answer starts."""
        raise NotImplementedError

    def segments(self, conversations: list[dict], tokenizer=None) -> list[tuple[str, bool]]:
        """``(text, is_answer)`` pieces whose concatenation is the training text."""
        raise NotImplementedError

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end an assistant answer (for generation)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ChatTemplate(ConversationTemplate):
    """Role-tagged chat formats (Phi-3, Llama-3, ChatML/Qwen2)."""

    bos: str = ""  # literal text that opens the conversation
    system_fmt: str = "{}"
    user_fmt: str = "{}"
    assistant_prefix: str = ""
    end_of_turn: str = ""
    turn_sep: str = ""
    default_system: str | None = None
    skip_empty_system: bool = False
    trim: bool = False
    eos_after_last: bool = False  # the official template appends ``eos_token`` (Phi-3)
    move_image_first: bool = True  # a user turn's single <image> goes first (:func:`image_first`)

    @property
    def stop_strings(self) -> list[str]:
        return [self.end_of_turn]

    def _clean(self, text: str) -> str:
        return text.strip() if self.trim else text

    def _user(self, text: str) -> str:
        """One user turn's text in the template."""
        return self.user_fmt.format(self._clean(image_first(text) if self.move_image_first else text))

    def _head(self, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
        head = self.bos
        if turns and turns[0][0] == "system":
            system, turns = turns[0][1], turns[1:]
        else:
            system = self.default_system
        if system is not None and not (self.skip_empty_system and not system):
            head += self.system_fmt.format(self._clean(system))
        return head, turns

    def segments(self, conversations: list[dict], tokenizer=None) -> list[tuple[str, bool]]:
        turns = normalize_turns(conversations)
        head, turns = self._head(turns)
        if not turns or turns[-1][0] != "assistant":
            raise ValueError("a training conversation must end with an assistant (gpt) turn")
        out: list[tuple[str, bool]] = [(head, False)]
        for role, text in turns:
            if role == "user":
                out.append((self._user(text), False))
            else:
                out.append((self.assistant_prefix, False))
                out.append((self._clean(text) + self.end_of_turn, True))
                out.append((self.turn_sep, False))
        if self.eos_after_last:
            eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
            if eos is None:
                raise ValueError(f"template {self.name!r} needs a tokenizer with an eos_token")
            out.append((eos, False))
        return [(t, a) for t, a in out if t]

    def prompt(self, question: str, history: list[dict] | None = None) -> str:
        turns = normalize_turns(list(history or []) + [{"from": "human", "value": question}])
        head, turns = self._head(turns)
        text = head
        for role, value in turns:
            if role == "user":
                text += self._user(value)
            else:
                text += self.assistant_prefix + self._clean(value) + self.end_of_turn + self.turn_sep
        return text + self.assistant_prefix


@dataclass(frozen=True)
class PlainTemplate(ConversationTemplate):
    """LLaVA's pretraining format: the image placeholders, then the caption.

    The human text other than its ``<image>`` placeholders is dropped; loss is on the
    caption and the closing newline. One human and one gpt turn only.
    """

    sep: str = "\n"

    @property
    def stop_strings(self) -> list[str]:
        return [self.sep]

    def segments(self, conversations: list[dict], tokenizer=None) -> list[tuple[str, bool]]:
        turns = [t for t in normalize_turns(conversations) if t[0] != "system"]
        if len(turns) != 2:
            raise ValueError(f"template 'plain' takes one human and one gpt turn, got {len(turns)} turns")
        images = IMAGE_PLACEHOLDER * turns[0][1].count(IMAGE_PLACEHOLDER)
        return [(t, a) for t, a in [(images, False), (turns[1][1] + self.sep, True)] if t]

    def prompt(self, question: str, history: list[dict] | None = None) -> str:
        if history:
            raise ValueError("template 'plain' has no multi-turn history")
        return IMAGE_PLACEHOLDER * question.count(IMAGE_PLACEHOLDER)


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenise the joined text; label the tokens that start inside an answer segment.

    Fast tokenizers tokenise the whole text at once (ids identical to tokenising the
    rendered string) and use character offsets: a token is labelled when its start lies
    inside an answer span (``a <= start < b``). An added token with ``rstrip`` (Phi-3's
    ``<|end|>``, ``<|assistant|>``, ...) has an offset that also covers the whitespace it
    strips, so the end-of-turn token reaches past the answer (over the ``\n`` turn
    separator) and is still labelled. For an added token with ``lstrip`` that reaches into
    an answer from before it, the start is where its own text begins, not the whitespace
    it strips (an end-of-turn token after an empty or all-whitespace answer stays
    labelled). Whitespace that a prompt-side token strips (the answer's leading spaces
    after an ``rstrip`` ``<|assistant|>``) belongs to that token and is not labelled.
    Slow tokenizers tokenise segment by segment.
    Raises ``ValueError`` if an answer ends up with no labelled token.
    """
    spans, pos = [], 0
    for text, is_answer in segments:
        if is_answer:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    full = "".join(t for t, _ in segments)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        hits = [0] * len(spans)
        lstripped: dict[int, str] | None = None  # id -> text of the added tokens with lstrip, built on demand
        for k, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:
                continue
            start = s
            if any(s < a < e for a, _ in spans):  # reaches into an answer from before it
                if lstripped is None:
                    lstripped = _lstrip_added_tokens(tokenizer)
                own = lstripped.get(ids[k])
                at = full.find(own, s, e) if own else -1
                if at >= 0:  # its own text, after the whitespace it strips
                    start = at
            for j, (a, b) in enumerate(spans):
                if a <= start < b:
                    labels[k] = ids[k]
                    hits[j] += 1
                    break
    else:
        ids, labels, hits = [], [], []
        for text, is_answer in segments:
            piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.extend(piece)
            labels.extend(piece if is_answer else [IGNORE_INDEX] * len(piece))
            if is_answer:
                hits.append(len(piece))
    for j, n in enumerate(hits):
        if n == 0:
            raise ValueError(f"assistant answer {j} has no token of its own after tokenisation")
    return ids, labels


def _lstrip_added_tokens(tokenizer) -> dict[int, str]:
    """``{id: text}`` of the tokenizer's added tokens that strip the whitespace on their left."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i: str(getattr(t, "content", t)) for i, t in added.items() if getattr(t, "lstrip", False)}


_PHI3 = {
    "system_fmt": "<|system|>\n{}<|end|>\n",
    "user_fmt": "<|user|>\n{}<|end|>\n",
    "assistant_prefix": "<|assistant|>\n",
    "end_of_turn": "<|end|>",
    "turn_sep": "\n",
    "eos_after_last": True,
}
_CHATML = {
    "system_fmt": "<|im_start|>system\n{}<|im_end|>\n",
    "user_fmt": "<|im_start|>user\n{}<|im_end|>\n",
    "assistant_prefix": "<|im_start|>assistant\n",
    "end_of_turn": "<|im_end|>",
    "turn_sep": "\n",
}

TEMPLATES: dict[str, ConversationTemplate] = {
    "plain": PlainTemplate(name="plain"),
    # microsoft/Phi-3-mini-4k-instruct: system turn emitted whenever present.
    "phi3": ChatTemplate(name="phi3", **_PHI3),
    # microsoft/Phi-3.5-mini-instruct: same, but an empty system message is dropped.
    "phi35": ChatTemplate(name="phi35", skip_empty_system=True, **_PHI3),
    # meta-llama/Meta-Llama-3-8B-Instruct: contents are trimmed, bos opens the text.
    "llama3": ChatTemplate(
        name="llama3",
        bos="<|begin_of_text|>",
        system_fmt="<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
        user_fmt="<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        trim=True,
    ),
    # Qwen/Qwen2-*-Instruct: ChatML with a default system prompt.
    "qwen2": ChatTemplate(name="qwen2", default_system="You are a helpful assistant.", **_CHATML),
    "chatml": ChatTemplate(name="chatml", **_CHATML),
}


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def available_templates() -> list[str]:
    """Names accepted by :func:`get_template`."""
    return sorted(TEMPLATES)
