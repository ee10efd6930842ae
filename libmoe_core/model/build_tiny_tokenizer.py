"""Rebuild the tiny preset's tokenizer (a small byte-level BPE) deterministically.

    python -m libmoe_core.model.build_tiny_tokenizer [--out DIR] [--vocab-size 1024]

The corpus is the bundled easy-VQA question/answer text plus the words of the chat
templates, sorted and de-duplicated so the result does not depend on data order.
Special tokens cover every supported template (Phi-3, Llama-3, Qwen2/ChatML) and
the ``<image>`` placeholder, so the tiny model can be trained with any of them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ASSET_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"

BOS_EOS = "<|endoftext|>"
PAD = "<pad>"
IMAGE = "<image>"
CHAT_SPECIALS = [
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",  # Phi-3 / 3.5
    "<|im_start|>", "<|im_end|>",  # ChatML / Qwen2
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama-3
]
SPECIAL_TOKENS = [BOS_EOS, PAD, IMAGE, *CHAT_SPECIALS]

EXTRA_TEXT = [
    "user", "assistant", "system", "Answer the question using a single word or phrase.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful assistant.", "Yes", "No", "yes", "no", "What", "Is", "Does", "the image",
]


def corpus() -> list[str]:
    """Sorted unique lines: easy-VQA questions and answers plus template words."""
    from easy_vqa import get_answers, get_test_questions, get_train_questions

    lines: set[str] = set(EXTRA_TEXT)
    for questions, answers, _ in (get_train_questions(), get_test_questions()):
        lines.update(questions)
        lines.update(answers)
    lines.update(get_answers())
    return sorted(lines)


def build(out_dir: Path = ASSET_DIR, vocab_size: int = 1024) -> Path:
    """Train the BPE and save it as a transformers fast tokenizer in ``out_dir``."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-threaded training: reproducible merges
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus()
    # Repeat each line so frequent easy-VQA words merge into whole tokens.
    tok.train_from_iterator([line for line in lines for _ in range(4)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        additional_special_tokens=[IMAGE, *CHAT_SPECIALS],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    path = build(args.out, args.vocab_size)
    print(f"tokenizer written to {path}")


if __name__ == "__main__":
    main()
