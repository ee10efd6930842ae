"""Tiny offline tokenizers for tests and demos (no hub access).

``build_tiny_tokenizer`` trains a small BPE on a built-in corpus in well under a second
and registers ``<image>`` plus the special tokens of every conversation template, so
each template renders to real ids. ``style`` picks the pre-tokenizer family:
``"bytelevel"`` (GPT-2/Llama-3/Qwen2 style) or ``"metaspace"`` (SentencePiece style, Phi-3).
"""

from __future__ import annotations

from ..tokens import IMAGE_PLACEHOLDER

TEMPLATE_SPECIAL_TOKENS = [
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>",
]

_CORPUS = [
    "What color is the shape? What shape is in the image? Is there a circle in the image?",
    "Does the image contain a red triangle? Yes. No. The shape is a blue rectangle.",
    "a green circle, a yellow triangle, a teal rectangle, a brown shape, a black square, gray, red.",
    "Describe the picture briefly. Answer the question using a single word or phrase.",
    "You are a helpful assistant. The quick brown fox jumps over the lazy dog 0123456789.",
    "There are two cats on the sofa; one is sleeping and the other looks at the camera!",
]


def build_tiny_tokenizer(style: str = "bytelevel", chat_template: str | None = None, vocab_size: int = 400):
    """A ``PreTrainedTokenizerFast`` with ``<image>`` and the template special tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if style == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]
    else:
        raise ValueError(f"unknown tokenizer style {style!r} (bytelevel, metaspace)")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER] + TEMPLATE_SPECIAL_TOKENS})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
