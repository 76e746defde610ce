"""SFT data: formats, safe tokenisation (exact supervised ids), truncation, packing, batching.

Tokenizers are trained in-process (byte-level BPE, a few milliseconds): a
ChatML one without BOS (Qwen style) and a Llama-3 style one whose
post-processor adds BOS and whose chat template also writes `{{ bos_token }}`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from edgetune.errors import InputError, UserError
from edgetune.recipe import DataConfig
from edgetune.sft_data import (
    Example,
    TokenizationError,
    TokenizedExample,
    collate,
    data_files,
    first_fit,
    load_sft_rows,
    make_batches,
    padding_fraction,
    tokenize_dataset,
    tokenize_example,
    truncate_left,
)

CORPUS = ["hello world, how are you today?", "the quick brown fox jumps over the lazy dog",
          "fine thanks and you", "a system prompt says be brief", "explain dns in one sentence please"] * 4

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
          "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def make_tokenizer(specials: list[str], template: str | None, bos: str | None = None, eos: str | None = None,
                   pad: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos is not None:  # the post-processor adds BOS, as Llama 3's does
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, eos="<|im_end|>",
                          pad="<|endoftext|>")


@pytest.fixture(scope="module")
def llama3():
    return make_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"], LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>")


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def chat(prompt: str, reply: str, system: str | None = None, id: str = "ex:1") -> Example:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return Example(id, msgs, [{"role": "assistant", "content": reply}])


def supervised(tokens: list[int], prompt_len: int) -> list[int]:
    """The targets the loss sees, read back through the batch arrays (not from prompt_len)."""
    batch = collate([[TokenizedExample("x", np.array(tokens, np.int32), prompt_len)]])
    return batch.targets[batch.loss_mask > 0].tolist()


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- tokenising: exact supervised ids -------------------------------------------------------------

def test_chatml_supervises_the_reply_and_end_of_turn_only(chatml):
    tokens, prompt_len = tokenize_example(chat("hello world", "fine thanks"), chatml, vocab_size=len(chatml))
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    prompt = enc(chatml, "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")
    assert tokens[:prompt_len] == prompt
    # The reply, then <|im_end|>; the template's trailing newline is left out of the sequence.
    assert supervised(tokens, prompt_len) == enc(chatml, "fine thanks") + [im_end]
    assert tokens == prompt + enc(chatml, "fine thanks") + [im_end]


def test_llama3_gets_exactly_one_bos_though_template_and_tokenizer_both_add_it(llama3):
    bos, eot = llama3.convert_tokens_to_ids("<|begin_of_text|>"), llama3.convert_tokens_to_ids("<|eot_id|>")
    # The trap this guards against: templating, then encoding with special tokens.
    text = llama3.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert llama3.encode(text)[:2] == [bos, bos]
    tokens, prompt_len = tokenize_example(chat("hello", "fine thanks"), llama3, vocab_size=len(llama3))
    assert tokens.count(bos) == 1 and tokens[0] == bos
    assert supervised(tokens, prompt_len) == enc(llama3, "fine thanks") + [eot]


def test_plain_prompt_completion_is_raw_text_with_bos_and_eos(llama3, chatml):
    ex = Example("ex:1", "the quick brown", " fox jumps", chat_template=False)
    bos, eot = llama3.convert_tokens_to_ids("<|begin_of_text|>"), llama3.convert_tokens_to_ids("<|eot_id|>")
    tokens, prompt_len = tokenize_example(ex, llama3)
    assert tokens == [bos] + enc(llama3, "the quick brown") + enc(llama3, " fox jumps") + [eot]
    assert supervised(tokens, prompt_len) == enc(llama3, " fox jumps") + [eot]
    tokens, prompt_len = tokenize_example(ex, chatml)  # no BOS in this family
    assert tokens[:prompt_len] == enc(chatml, "the quick brown")


def test_text_rows_train_every_token_after_bos(llama3):
    tokens, prompt_len = tokenize_example(Example("t:1", "", "hello world", chat_template=False), llama3)
    assert prompt_len == 1
    assert supervised(tokens, prompt_len) == enc(llama3, "hello world") + [llama3.eos_token_id]


def test_string_completions_use_the_chat_template_when_there_is_one(chatml):
    tokens, _ = tokenize_example(Example("c:1", "hello world", "fine thanks"), chatml)
    assert tokens == tokenize_example(chat("hello world", "fine thanks"), chatml)[0]


def test_eos_is_appended_when_the_template_writes_no_end_of_turn(chatml):
    plain = make_tokenizer(["<|endoftext|>"], "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}", eos="<|endoftext|>")
    tokens, prompt_len = tokenize_example(chat("hello", "fine"), plain)
    assert supervised(tokens, prompt_len) == enc(plain, "fine\n") + [plain.eos_token_id]


def test_mlx_lm_wrapper_is_accepted_and_gives_the_same_tokens(chatml):
    from edgetune.runtime import setup_fast_blas

    setup_fast_blas()  # mlx_lm imports MLX; later tests in this process need the fast BLAS loaded first
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    wrapped = TokenizerWrapper(chatml, eos_token_ids=[chatml.convert_tokens_to_ids("<|endoftext|>")])
    ex = chat("hello world", "fine thanks")
    assert tokenize_example(ex, wrapped, len(chatml)) == tokenize_example(ex, chatml, len(chatml))


# --- tokenising: named errors -----------------------------------------------------------------------

def test_prefix_check_fires_on_a_template_that_renders_the_prompt_differently():
    # A broken template: the system line depends on whether a reply follows.
    broken = make_tokenizer(["<|im_start|>", "<|im_end|>"],
                            "<|im_start|>system\n{% if messages[-1]['role'] == 'assistant' %}be brief"
                            "{% else %}hello{% endif %}<|im_end|>\n" + CHATML, eos="<|im_end|>")
    with pytest.raises(TokenizationError) as e:
        tokenize_example(chat("hello", "fine", id="data.jsonl:7"), broken)
    position = len(enc(broken, "<|im_start|>system\n"))
    assert str(e.value).startswith(f"data.jsonl:7: the prompt's tokens are not a prefix of prompt + completion "
                                   f"tokens (first difference at token {position}: ")


def test_doubled_bos_is_an_error(llama3):
    doubled = make_tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                             "{{ bos_token }}" + LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    with pytest.raises(TokenizationError, match=r"^ex:1: BOS '<\|begin_of_text\|>' appears again at position 1 "
                                                r"\(the chat template writes BOS and the tokenizer adds another\)"):
        tokenize_example(chat("hello", "fine"), doubled)


def test_bos_inside_the_text_is_an_error(llama3):
    with pytest.raises(TokenizationError, match=r"appears again at position \d+ \(the text contains the BOS token\)"):
        tokenize_example(chat("hello <|begin_of_text|> world", "fine"), llama3)


def test_token_ids_past_the_model_vocabulary_are_an_error(chatml):
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(TokenizationError, match=rf"^ex:1: token {im_end} '<\|im_end\|>' at position \d+ is "
                                                rf"outside the model's vocabulary of {im_end}; are the tokenizer"):
        tokenize_example(chat("hello", "fine"), chatml, vocab_size=im_end)


def test_template_failure_names_the_example():
    strict = make_tokenizer(["<|im_start|>", "<|im_end|>"], "{% if messages[0]['role'] != 'system' %}"
                            "{{ raise_exception('a system message must come first') }}{% endif %}" + CHATML,
                            eos="<|im_end|>")
    with pytest.raises(TokenizationError, match=r"^rows.jsonl:3: the chat template failed on this example "
                                                r"\(TemplateError: a system message must come first\)"):
        tokenize_example(chat("hello", "fine", id="rows.jsonl:3"), strict)


def test_tokenize_dataset_reports_every_failing_example_at_once(chatml):
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    rows = [chat("hello", "fine", id=f"f:{i}") for i in range(3)]
    with pytest.raises(TokenizationError) as e:
        tokenize_dataset(rows, chatml, 512, "left", vocab_size=im_end)
    assert [line.split(":")[:2] for line in str(e.value).splitlines()] == [["f", "0"], ["f", "1"], ["f", "2"]]


# --- truncation -------------------------------------------------------------------------------------

def test_truncate_left_hand_worked():
    # BOS=1, prompt 10 11 12 13, completion 20 21 2 (prompt_len 5), fit into 6 tokens.
    assert truncate_left([1, 10, 11, 12, 13, 20, 21, 2], 5, 6, n_keep=1) == ([1, 12, 13, 20, 21, 2], 3)
    # Fits already: unchanged.
    assert truncate_left([1, 10, 20, 2], 2, 8, n_keep=1) == ([1, 10, 20, 2], 2)
    # At least one prompt token must stay after BOS: 1 + 1 + 3 > 4, so dropped.
    assert truncate_left([1, 10, 11, 20, 21, 2], 3, 4, n_keep=1) is None
    assert truncate_left([10, 11, 20, 21, 2], 2, 4, n_keep=0) == ([11, 20, 21, 2], 1)


def test_left_truncation_keeps_bos_and_the_whole_completion(llama3):
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    ex = chat(long_prompt, "fine thanks and you", system="a system prompt says be brief")
    full, full_prompt_len = tokenize_example(ex, llama3)
    limit = len(full) - 10
    kept, stats = tokenize_dataset([ex], llama3, limit, "left", len(llama3))
    (t,) = kept
    tokens = t.tokens.tolist()
    assert len(tokens) == limit and tokens[0] == llama3.bos_token_id
    assert tokens[1:] == full[11:]  # ten prompt tokens after BOS are gone, the start of the system turn first
    assert supervised(tokens, t.prompt_len) == supervised(full, full_prompt_len)
    assert stats["truncated"] == 1 and stats["kept"] == 1 and stats["examples_truncated"] == ["ex:1"]


def test_drop_counting(chatml):
    short, long_ = chat("hello", "fine", id="a:1"), chat("hello world " * 20, "fine", id="a:2")
    too_long_reply = chat("hello", "fine thanks " * 40, id="a:3")
    limit = len(tokenize_example(short, chatml)[0]) + 4
    kept, stats = tokenize_dataset([short, long_, too_long_reply], chatml, limit, "drop", len(chatml))
    assert [t.id for t in kept] == ["a:1"]
    assert (stats["dropped_too_long"], stats["dropped_completion_too_long"], stats["truncated"]) == (2, 0, 0)
    kept, stats = tokenize_dataset([short, long_, too_long_reply], chatml, limit, "left", len(chatml))
    assert [t.id for t in kept] == ["a:1", "a:2"]
    assert (stats["dropped_too_long"], stats["dropped_completion_too_long"], stats["truncated"]) == (0, 1, 1)
    assert stats["examples_dropped"] == ["a:3"]
    assert stats["supervised_tokens"] == sum(int(collate([[t]]).loss_mask.sum()) for t in kept)


# --- reading rows -----------------------------------------------------------------------------------

USER = {"role": "user", "content": "hello"}
REPLY = {"role": "assistant", "content": "fine"}


def test_data_build_folder(tmp_path):
    write_jsonl(tmp_path / "build" / "train" / "sft.jsonl",
                [{"prompt": [USER], "completion": [REPLY], "source": {"rule": "thumbs_up", "conversation": "c1"}}])
    (ex,) = load_sft_rows(str(tmp_path / "build"), "train")
    assert (ex.prompt, ex.completion, ex.source["conversation"]) == ([USER], [REPLY], "c1")
    assert ex.id == f"{tmp_path / 'build' / 'train' / 'sft.jsonl'}:1"
    assert load_sft_rows(DataConfig(dir=str(tmp_path / "build")), "eval") == []  # no eval split written
    assert data_files(DataConfig(dir=str(tmp_path / "build"))) == [tmp_path / "build" / "train" / "sft.jsonl"]
    with pytest.raises(UserError, match="no such data folder; make it with `edgetune data build"):
        load_sft_rows(DataConfig(dir=str(tmp_path / "nope")), "train")


@pytest.mark.parametrize("row, prompt, completion, chat_template", [
    ({"messages": [{"role": "system", "content": "s"}, USER, REPLY]},
     [{"role": "system", "content": "s"}, USER], [REPLY], True),
    ({"prompt": [USER], "completion": [REPLY]}, [USER], [REPLY], True),
    ({"prompt": "hello", "completion": "fine"}, "hello", "fine", True),  # mlx-lm completions
    ({"text": "hello world"}, "", "hello world", False),
], ids=["messages", "prompt_completion", "mlx_completions", "mlx_text"])
def test_each_format_is_detected_and_parsed(tmp_path, row, prompt, completion, chat_template):
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    rows = load_sft_rows(DataConfig(train=[str(path)]), "train")
    assert len(rows) == 2
    assert (rows[1].prompt, rows[1].completion, rows[1].chat_template) == (prompt, completion, chat_template)
    assert rows[1].id == f"{path}:2"


def test_explicit_prompt_completion_format_trains_raw_strings(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hello", "completion": "fine"}])
    (ex,) = load_sft_rows(DataConfig(train=[str(path)], format="prompt_completion"), "train")
    assert ex.chat_template is False


def test_files_globs_and_gzip(tmp_path):
    import gzip

    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"messages": [USER, REPLY]}) + "\n")
    spec = DataConfig(train=[str(tmp_path / "*.jsonl*")], eval=[str(tmp_path / "a.jsonl")])
    rows = load_sft_rows(spec, "train")
    assert [r.id.rsplit("/", 1)[1] for r in rows] == ["a.jsonl:1", "b.jsonl.gz:1"]
    assert data_files(spec) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "a.jsonl"]


def test_malformed_rows_are_all_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [USER, REPLY]},
        "{not json",
        {"messages": [REPLY, USER]},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": 3}, REPLY]},
        {"text": "wrong format for this file"},
    ])
    with pytest.raises(InputError) as e:
        load_sft_rows(DataConfig(train=[str(path)]), "train")
    assert str(e.value).splitlines() == [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: the last message must be the assistant's reply (it is what is trained); got role 'user' "
        "(format messages)",
        f"{path}:4: `messages` must be a list of messages (format messages)",
        f"{path}:5: `messages[0].content` must be a string (format messages)",
        f"{path}:6: `messages` must be a list of messages (format messages)",
    ]


def test_problem_list_is_capped(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [USER, REPLY]}] + ["{"] * 25)
    with pytest.raises(InputError) as e:
        load_sft_rows(DataConfig(train=[str(path)]), "train")
    lines = str(e.value).splitlines()
    assert len(lines) == 21 and lines[-1] == f"{path}: ... and 5 more problems"


def test_undetectable_and_preference_rows_say_what_to_do(tmp_path):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": [USER], "chosen": [REPLY], "rejected": [REPLY]}])
    with pytest.raises(InputError) as e:
        load_sft_rows(DataConfig(train=[str(odd), str(dpo)]), "train")
    assert str(e.value).splitlines() == [
        f"{odd}:1: cannot tell the row format from its keys (answer, question); expected messages, "
        "prompt+completion, or text; set data.format to say which format this file is",
        f"{dpo}:1: this is a preference (DPO) row (chosen/rejected); SFT needs prompt+completion, messages or text "
        "rows; set data.format to say which format this file is",
    ]


def test_missing_files_and_empty_training_split_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_sft_rows(DataConfig(train=[str(tmp_path / "none.jsonl")]), "train")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match="no training rows"):
        load_sft_rows(DataConfig(train=[str(empty)]), "train")


# --- packing and batching ---------------------------------------------------------------------------

def fake(i: int, length: int, prompt_len: int) -> TokenizedExample:
    """An example whose token values encode (example, position), so misplaced tokens show."""
    return TokenizedExample(f"e{i}", np.arange(length, dtype=np.int32) + 1000 * (i + 1), prompt_len)


def test_first_fit_hand_worked():
    # 5 -> row0 (3 left); 4 -> row1 (4 left); 3 -> row0 (0); 3 -> row1 (1); 2 -> row2 (6); 1 -> row1 (0).
    assert first_fit([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


def test_collate_hand_worked():
    a = TokenizedExample("a", np.array([1, 10, 11, 20, 2], np.int32), 3)  # BOS, prompt 10 11, reply 20, EOS
    b = TokenizedExample("b", np.array([1, 12, 21, 2], np.int32), 2)
    batch = collate([[a, b]], pad_multiple=8)
    assert batch.tokens.tolist() == [[1, 10, 11, 20, 1, 12, 21, 0]]
    assert batch.targets.tolist() == [[10, 11, 20, 2, 12, 21, 2, 0]]
    # Supervised: 20 and EOS of a; 21 and EOS of b. Never the jump from a's EOS to b's BOS,
    # which is not a target at all: a's last input (20) predicts a's EOS.
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 1, 1, 0]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 0]]
    assert (batch.example_ids, batch.n_supervised) == (["a", "b"], 4)


def test_packing_invariants():
    rng = np.random.default_rng(0)
    examples = [fake(i, int(n), int(rng.integers(1, n))) for i, n in enumerate(rng.integers(3, 60, 200))]
    batches = make_batches(examples, batch_size=4, max_seq_len=128, packing=True, seed=1, epoch=0)
    by_id = {ex.id: ex for ex in examples}
    seen = []
    for batch in batches:
        assert batch.tokens.shape[1] % 8 == 0 and batch.tokens.shape[1] <= 128
        assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == np.float32
        k = 0
        for b in range(batch.tokens.shape[0]):
            seg = batch.segment_ids[b]
            real = seg > 0
            assert real[: real.sum()].all()  # padding only at the end of a row
            for s in range(1, seg.max() + 1):
                ex = by_id[batch.example_ids[k]]
                k += 1
                where = np.nonzero(seg == s)[0]
                # The whole example, contiguous, in one row: never split.
                assert where.tolist() == list(range(where[0], where[0] + ex.n_positions))
                assert batch.tokens[b, where].tolist() == ex.tokens[:-1].tolist()
                assert batch.targets[b, where].tolist() == ex.tokens[1:].tolist()
                assert batch.loss_mask[b, where].tolist() == [float(j + 1 >= ex.prompt_len)
                                                               for j in range(ex.n_positions)]
            assert np.all(batch.loss_mask[b][seg == 0] == 0)
        assert k == len(batch.example_ids)
        assert batch.n_supervised == int(batch.loss_mask.sum())
        seen += batch.example_ids
    assert sorted(seen) == sorted(by_id)
    assert padding_fraction(batches) < 0.1


def test_batches_are_a_pure_function_of_seed_and_epoch():
    rng = np.random.default_rng(0)
    examples = [fake(i, int(n), 2) for i, n in enumerate(rng.integers(3, 40, 100))]
    for packing in (True, False):
        a = make_batches(examples, 4, 64, packing, seed=3, epoch=2)
        b = make_batches(examples, 4, 64, packing, seed=3, epoch=2)
        assert [x.example_ids for x in a] == [y.example_ids for y in b]
        assert all(np.array_equal(x.tokens, y.tokens) and np.array_equal(x.loss_mask, y.loss_mask)
                   for x, y in zip(a, b))
        other = make_batches(examples, 4, 64, packing, seed=3, epoch=3)
        assert [x.example_ids for x in other] != [x.example_ids for x in a]
        assert sorted(sum((x.example_ids for x in other), [])) == sorted(sum((x.example_ids for x in a), []))


def test_length_grouping_wastes_far_less_padding_than_random_batches():
    """mlx-lm issue 596: its length sort sorted nothing (every item's length read as 1)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=5.0, sigma=0.8, size=2000).astype(int), 4, 1024)
    examples = [fake(i, int(n), 1) for i, n in enumerate(lengths)]
    grouped = make_batches(examples, 8, 1024, packing=False, seed=0, epoch=0)
    order = rng.permutation(len(examples))
    random_batches = [collate([[examples[i]] for i in order[j: j + 8]]) for j in range(0, len(order), 8)]
    waste_grouped, waste_random = padding_fraction(grouped), padding_fraction(random_batches)
    assert waste_random > 0.4
    assert waste_grouped < 0.05 and waste_grouped < waste_random / 10  # measured: 60% vs 2.6%
    packed = make_batches(examples, 8, 1024, packing=True, seed=0, epoch=0)
    assert padding_fraction(packed) < 0.02


def test_unpacked_batches_have_one_segment_per_row():
    examples = [fake(i, n, 1) for i, n in enumerate([5, 9, 12, 3, 7])]
    for batch in make_batches(examples, 2, 16, packing=False, seed=0, epoch=0):
        assert batch.segment_ids.max(axis=1).tolist() == [1] * batch.tokens.shape[0]


def test_an_example_longer_than_max_seq_len_is_a_bug_not_silently_cut():
    with pytest.raises(ValueError, match="e0: 9 positions exceed max_seq_len 8"):
        make_batches([fake(0, 10, 1)], 1, 8, packing=True, seed=0, epoch=0)


def test_end_to_end_rows_to_batches(tmp_path, chatml):
    """A file of chat rows through tokenising and packing: supervised ids read back from the batch."""
    rows = [{"messages": [{"role": "user", "content": f"hello {w}"}, {"role": "assistant", "content": w}]}
            for w in ("world", "fox", "dog", "you")]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples, stats = tokenize_dataset(load_sft_rows(DataConfig(train=[str(path)]), "train"), chatml, 256, "left",
                                       len(chatml))
    (batch,) = make_batches(examples, 4, 256, packing=True, seed=0, epoch=0)
    assert batch.tokens.shape[0] == 1  # all four fit one row
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    got = batch.targets[batch.loss_mask > 0].tolist()
    expected = sum((enc(chatml, rows[int(i.rsplit(":", 1)[1]) - 1]["messages"][1]["content"]) + [im_end]
                    for i in batch.example_ids), [])
    assert got == expected
    assert stats["supervised_tokens"] == batch.n_supervised


# --- the real tiny model folders (tokenizer files as shipped, loaded the way training loads them) ----

@pytest.mark.parametrize("arch, end", [("qwen2", "<|im_end|>"), ("llama", "<|eot_id|>")])
def test_tiny_model_tokenizers_through_mlx_lm(tmp_path, arch, end):
    """Weights do not matter here, so the folder is built without its pre-training pass."""
    from edgetune.model.tiny import build_tiny_model
    from edgetune.runtime import setup_fast_blas

    setup_fast_blas()
    from mlx_lm.utils import load_tokenizer

    folder = build_tiny_model(tmp_path / arch, arch=arch, pretrain=False)
    config = json.loads((folder / "config.json").read_text())
    eos = config["eos_token_id"]
    tok = load_tokenizer(folder, eos_token_ids=eos if isinstance(eos, list) else [eos])
    ex = chat("What is DNS?", "It maps names to addresses.", system="Be brief.")
    tokens, prompt_len = tokenize_example(ex, tok, config["vocab_size"])
    assert supervised(tokens, prompt_len) == enc(tok, "It maps names to addresses.") + [tok.convert_tokens_to_ids(end)]
    if arch == "llama":  # BOS from both the template and the post-processor, kept once
        assert tokens[0] == tok.bos_token_id and tokens.count(tok.bos_token_id) == 1
    assert tok.decode(tokens[:prompt_len]).endswith("assistant<|end_header_id|>\n\n" if arch == "llama"
                                                    else "<|im_start|>assistant\n")
