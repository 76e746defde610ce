"""Byte-level BPE tokenizers for the tiny models, trained in-process.

Each architecture gets the special tokens, chat template and pre-tokenizer of
the real model family it stands in for, so code that works on the tiny model
meets the same quirks on the real one:

- `qwen2`: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), no BOS, end of turn
  `<|im_end|>` is the EOS, and the pad token is `<|endoftext|>` (pad != EOS:
  a collator that masks pad positions must not also mask the trained EOS).
  The normalizer and pre-tokenizer are exactly the ones transformers'
  `Qwen2Tokenizer` hard-codes, so it and the raw tokenizer.json agree.
- `llama`: Llama 3 headers (`<|start_header_id|>role<|end_header_id|>\\n\\n`),
  `<|eot_id|>` ends a turn and is the EOS, and `<|begin_of_text|>` is added
  BOTH by the post-processor and by the chat template's `{{ bos_token }}`,
  as in real Llama 3: templating and then encoding with special tokens gives
  two BOS tokens, which the SFT stage must detect.

Special tokens sit after the learned vocabulary, as in the real models.
Training is deterministic: same corpus, same merges, same tokenizer.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from edgetune.model import corpus

# Qwen2's split pattern (transformers' tokenization_qwen2.PRETOKENIZE_REGEX):
# digits one at a time.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's split pattern: digits in groups of up to three.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's template, verbatim in behaviour.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """The special tokens and chat layout of one architecture family."""

    specials: tuple[str, ...]  # appended after the BPE vocabulary, in this order
    bos: str | None  # added by the post-processor (and the template), or None
    eos: str  # end of turn: generation stops here
    pad: str  # distinct from eos on purpose
    doc_end: str  # ends each pre-training document
    stop_tokens: tuple[str, ...]  # every token generation_config stops on
    chat_template: str
    split_regex: str
    nfc: bool


CHAT_FORMATS: dict[str, ChatFormat] = {
    "qwen2": ChatFormat(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        doc_end="<|endoftext|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        chat_template=CHATML_TEMPLATE,
        split_regex=QWEN2_SPLIT,
        nfc=True,
    ),
    "llama": ChatFormat(
        specials=(
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|finetune_right_pad_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        doc_end="<|end_of_text|>",
        stop_tokens=("<|end_of_text|>", "<|eot_id|>"),
        chat_template=LLAMA3_TEMPLATE,
        split_regex=LLAMA3_SPLIT,
        nfc=False,
    ),
}


def train_tokenizer(arch: str, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on the built-in corpus and add `arch`'s special tokens.

    `vocab_size` counts everything (256 byte tokens, merges, specials); the
    result may be smaller when the corpus runs out of pairs to merge.
    Raises KeyError for an unknown arch (callers validate it first).
    """
    fmt = CHAT_FORMATS[arch]
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    if fmt.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fmt.split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(fmt.specials),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus.tokenizer_texts(), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in fmt.specials])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if fmt.bos is None:
        tok.post_processor = byte_level
    else:
        bos_id = tok.token_to_id(fmt.bos)
        tok.post_processor = processors.Sequence([
            byte_level,
            processors.TemplateProcessing(
                single=f"{fmt.bos}:0 $A:0",
                pair=f"{fmt.bos}:0 $A:0 {fmt.bos}:1 $B:1",
                special_tokens=[(fmt.bos, bos_id)],
            ),
        ])
    return tok


def tokenizer_config(arch: str, tok: Tokenizer, model_max_length: int) -> dict:
    """The tokenizer_config.json that goes with `tok` (transformers 4.x and 5.x read it)."""
    fmt = CHAT_FORMATS[arch]
    added = {
        str(tok.token_to_id(s)): {
            "content": s, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for s in fmt.specials
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": fmt.bos,
        "chat_template": fmt.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": fmt.eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": fmt.pad,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def special_tokens_map(arch: str) -> dict:
    fmt = CHAT_FORMATS[arch]
    out = {"eos_token": fmt.eos, "pad_token": fmt.pad}
    if fmt.bos is not None:
        out = {"bos_token": fmt.bos, **out}
    return out
