"""Preference data, recipe sections and stage set-up: fast, no training."""

import json
from pathlib import Path

import numpy as np
import pytest

from edgetune.errors import InputError, UserError
from edgetune.pref_data import (group_batches, load_preference_rows, parse_preference_row, tokenize_pairs,
                                tokenize_unpaired)
from edgetune.preference import kto_balance_warning, resolve_init_adapter, spec_from_adapter
from edgetune.recipe import RecipeError, load_recipe

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]


def msg(text):
    return [{"role": "assistant", "content": text}]


class Data:  # the recipe's DataConfig shape
    def __init__(self, dir=None, train=(), eval=()):
        self.dir, self.train, self.eval = dir, list(train), list(eval)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- rows -----------------------------------------------------------------------------------------

def test_data_build_folder_pairs_and_missing_eval(tmp_path):
    write_jsonl(tmp_path / "train" / "dpo.jsonl",
                [{"prompt": PROMPT, "chosen": msg("Paris."), "rejected": msg("Lyon."), "source": {"rule": "x"}}])
    rows = load_preference_rows(Data(dir=str(tmp_path)), "train", "dpo")
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [(PROMPT, msg("Paris."), msg("Lyon."))]
    assert rows[0].id.endswith("dpo.jsonl:1")
    assert load_preference_rows(Data(dir=str(tmp_path)), "eval", "dpo") == []
    with pytest.raises(UserError, match="no train/kto.jsonl.*thumbs up/down"):
        load_preference_rows(Data(dir=str(tmp_path)), "train", "kto")


def test_trl_implicit_prompt_is_the_shared_leading_messages():
    row = parse_preference_row({"chosen": PROMPT + msg("Paris."), "rejected": PROMPT + msg("Lyon.")}, "dpo", "f:1")
    assert (row.prompt, row.chosen, row.rejected) == (PROMPT, msg("Paris."), msg("Lyon."))


def test_string_rows_and_kto_rows():
    row = parse_preference_row({"prompt": "Capital?", "chosen": "Paris.", "rejected": "Lyon."}, "dpo", "f:1")
    assert (row.prompt, row.chosen, row.rejected) == ("Capital?", "Paris.", "Lyon.")
    kto = parse_preference_row({"prompt": PROMPT, "completion": msg("Paris."), "label": False}, "kto", "f:2")
    assert (kto.chosen, kto.label) == (msg("Paris."), False)


def test_every_bad_row_is_reported_with_file_line_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": PROMPT, "chosen": msg("a")},
        {"prompt": PROMPT, "completion": msg("a"), "label": True},
        "{not json",
        {"prompt": PROMPT, "chosen": [{"role": "user", "content": "x"}], "rejected": msg("b")},
        {"prompt": PROMPT, "chosen": msg("a"), "rejected": msg("b")},
    ])
    with pytest.raises(InputError) as e:
        load_preference_rows(Data(train=[str(path)]), "train", "dpo")
    lines = str(e.value).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"{path}:1: ") and "`chosen` and `rejected`" in lines[0]
    assert lines[1].startswith(f"{path}:2: ") and "edgetune kto" in lines[1]
    assert lines[2].startswith(f"{path}:3: ")
    assert lines[3].startswith(f"{path}:4: ") and "must end with an assistant message" in lines[3]
    with pytest.raises(InputError, match=r":1: .*`label` must be true"):
        load_preference_rows(Data(train=[str(write_jsonl(tmp_path / "k.jsonl", [
            {"prompt": PROMPT, "completion": msg("a"), "label": "yes"}]))]), "train", "kto")


# --- tokenising and batching (tiny model's ChatML tokenizer) --------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_pair_shares_the_prompt_and_supervises_each_completion_to_end_of_turn(tokenizer):
    row = parse_preference_row({"prompt": PROMPT, "chosen": msg("Paris."), "rejected": msg("Lyon, I think.")},
                               "dpo", "f:1")
    (pair,), stats = tokenize_pairs([row], tokenizer, 512, "left", 10**6)
    c, r = pair.chosen, pair.rejected
    assert c.prompt_len == r.prompt_len and list(c.tokens[: c.prompt_len]) == list(r.tokens[: r.prompt_len])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert c.tokens[-1] == end and r.tokens[-1] == end
    assert tokenizer.decode(list(c.tokens[c.prompt_len:])) == "Paris.<|im_end|>"
    assert stats["kept"] == 1 and stats["truncated"] == 0


def test_over_long_pair_loses_the_same_prompt_start_on_both_sides_or_is_dropped(tokenizer):
    row = parse_preference_row({"prompt": PROMPT, "chosen": msg("Paris."), "rejected": msg("Lyon, I think.")},
                               "dpo", "f:1")
    (full,), _ = tokenize_pairs([row], tokenizer, 512, "left", 10**6)
    limit = len(full.rejected.tokens) - 5
    (cut,), stats = tokenize_pairs([row], tokenizer, limit, "left", 10**6)
    assert stats["truncated"] == 1 and len(cut.rejected.tokens) == limit
    assert len(cut.chosen.tokens) == len(full.chosen.tokens) - 5
    assert cut.chosen.prompt_len == cut.rejected.prompt_len == full.chosen.prompt_len - 5
    kept, stats = tokenize_pairs([row], tokenizer, limit, "drop", 10**6)
    assert kept == [] and stats["dropped"] == 1


def test_unpaired_rows_keep_their_labels(tokenizer):
    rows = [parse_preference_row({"prompt": PROMPT, "completion": msg(t), "label": lab}, "kto", f"f:{i}")
            for i, (t, lab) in enumerate([("Paris.", True), ("Lyon.", False)])]
    examples, labels, stats = tokenize_unpaired(rows, tokenizer, 512, "left", 10**6)
    assert labels == [True, False] and (stats["desirable"], stats["undesirable"]) == (1, 1)
    assert len(examples) == 2


def test_group_batches_is_a_pure_function_of_seed_and_epoch_and_groups_lengths():
    lengths = [5, 50, 6, 51, 7, 52]
    a = group_batches(lengths, 2, seed=3, epoch=1)
    assert a == group_batches(lengths, 2, seed=3, epoch=1)
    assert sorted(i for g in a for i in g) == list(range(6))
    assert sorted(sorted(lengths[i] for i in g) for g in a) == [[5, 6], [7, 50], [51, 52]]


# --- KTO balance, init_from, recipe sections ------------------------------------------------------

def test_pack_items_places_every_item_whole_in_rows_within_capacity_deterministically():
    from edgetune.pref_data import pack_items

    rng = np.random.default_rng(0)
    lengths = [[int(a), int(b)] for a, b in rng.integers(5, 120, (200, 2))]
    batches = pack_items(lengths, 4, 128, seed=3, epoch=1)
    assert batches == pack_items(lengths, 4, 128, seed=3, epoch=1)
    seen = []
    for b in batches:
        assert 1 <= len(b.rows) <= 4
        for row in b.rows:
            assert sum(lengths[i][j] for i, j in row) <= 128
            assert all(i in b.items for i, _ in row)
        placed = sorted((i, j) for row in b.rows for i, j in row)
        assert placed == sorted((i, j) for i in b.items for j in (0, 1))  # both sequences, in this batch
        seen += b.items
    assert sorted(seen) == list(range(200))
    assert any(len({i for i, _ in row}) > 1 for b in batches for row in b.rows)  # rows are shared
    assert any({r for r, row in enumerate(b.rows) for i, j in row if i == b.items[0]} != {0}
               for b in batches)  # and a pair may sit in two rows
    # Padding-free and well filled: the positions used / offered.
    used = sum(map(sum, lengths)) / (len(batches) * 4 * 128)
    assert used > 0.85, used
    # KTO completions are items of one sequence; no items, no batches.
    assert sorted(i for b in pack_items([[7]] * 9, 2, 20, 0, 0) for i in b.items) == list(range(9))
    assert pack_items([], 4, 128, 0, 0) == []
    with pytest.raises(ValueError, match="exceeds the row capacity 128"):
        pack_items([[10, 129]], 4, 128, 0, 0)
    with pytest.raises(ValueError, match="do not fit 1 row"):
        pack_items([[100, 100]], 1, 128, 0, 0)


@pytest.mark.parametrize("chunk", [2000, 16])
def test_every_epoch_packs_the_same_batches_in_its_own_order(monkeypatch, chunk):
    """A step cursor maps to (epoch, batch) by a fixed batches-per-epoch count, so packing must
    not change with the epoch (ties in length and chunking once did); only the order does."""
    from edgetune import pref_data

    monkeypatch.setattr(pref_data, "PACK_CHUNK", chunk)
    rng = np.random.default_rng(1)
    lengths = [[int(a), int(b)] for a, b in rng.integers(20, 70, (49, 2))]  # many equal sums, split otherwise
    epochs = [pref_data.pack_items(lengths, 2, 128, seed=0, epoch=e) for e in range(4)]
    key = lambda batches: sorted(map(repr, batches))  # noqa: E731
    assert all(key(e) == key(epochs[0]) for e in epochs)
    assert len({tuple(map(repr, e)) for e in epochs}) > 1  # the order is reshuffled per epoch


def test_kto_imbalance_warning_suggests_weights():
    assert kto_balance_warning(10, 10, 1.0, 1.0) is None
    assert kto_balance_warning(12, 10, 1.0, 1.0) is None  # ratio 1.2 is in [1, 4/3]
    low = kto_balance_warning(10, 40, 1.0, 1.0)
    assert "ratio 0.25" in low and "--set kto.desirable_weight=4" in low
    high = kto_balance_warning(40, 10, 1.0, 1.0)
    assert "ratio 4.00" in high and "--set kto.undesirable_weight=4" in high
    assert "no undesirable" in kto_balance_warning(5, 0, 1.0, 1.0)


def test_init_from_accepts_a_run_folder_or_adapter_folder_and_names_the_problem(tmp_path):
    assert resolve_init_adapter("base") is None
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapters.safetensors").write_bytes(b"")
    assert resolve_init_adapter(str(tmp_path / "run")) == adapter
    assert resolve_init_adapter(str(adapter)) == adapter
    with pytest.raises(UserError, match="run `edgetune sft` first"):
        resolve_init_adapter(str(tmp_path))
    spec = spec_from_adapter({"num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.1,
                                                                   "keys": ["self_attn.q_proj"]}}, adapter)
    assert (spec.rank, spec.alpha, spec.dropout, spec.targets, spec.layers) == (4, 8.0, 0.1, ("self_attn.q_proj",), 2)
    with pytest.raises(UserError, match="adapter_config.json: not a LoRA adapter config"):
        spec_from_adapter({"num_layers": 2}, adapter)


def test_preference_sections_share_training_keys_and_check_their_own(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: ./m\noutput: run\ndata: d\ndpo:\n  steps: 3\n  init_from: ./sft-run\n"
                    "kto:\n  epochs: 1\n  desirable_weight: 2\norpo:\n  steps: 2\n")
    r = load_recipe(path)
    assert (r.dpo.beta, r.dpo.loss, r.dpo.label_smoothing, r.dpo.lora.rank) == (0.1, "sigmoid", 0.0, 8)
    assert r.dpo.init_from == str(tmp_path / "sft-run") and r.kto.init_from == "base"
    assert (r.kto.desirable_weight, r.kto.undesirable_weight, r.orpo.beta) == (2.0, 1.0, 0.1)
    path.write_text("model: ./m\noutput: run\ndata: d\ndpo:\n  beta: 0\n  loss: ipo\n  label_smoothing: 0.1\n"
                    "  packing: true\n  stepz: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = str(e.value)
    for needed in ("dpo.beta: must be greater than 0", "dpo.label_smoothing: applies to the sigmoid loss only",
                   "dpo.stepz: unknown key; did you mean dpo.steps?",
                   "dpo.steps: set exactly one of dpo.steps and dpo.epochs"):
        assert needed in text, text


def test_missing_stage_section_is_a_user_error_through_the_cli(tmp_path):
    from tests.test_sft_e2e import edgetune

    (tmp_path / "r.yaml").write_text("model: ./m\noutput: run\ndata: d\nsft:\n  steps: 3\n")
    res = edgetune("dpo", str(tmp_path / "r.yaml"))
    assert res.returncode == 2 and "no `dpo:` section" in res.stderr and "Traceback" not in res.stderr


def test_reference_file_is_keyed_by_a_fingerprint_of_rows(tmp_path):
    from edgetune.pref_data import rows_fingerprint
    from edgetune.sft_data import TokenizedExample

    a = [TokenizedExample("x", np.array([1, 2, 3], np.int32), 1)]
    b = [TokenizedExample("x", np.array([1, 2, 3], np.int32), 2)]
    assert rows_fingerprint(a) == rows_fingerprint(list(a)) != rows_fingerprint(b)


def test_resume_refuses_a_changed_reference(tmp_path):
    from edgetune.preference import _check_same_reference

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"reference_fingerprint": "abc"}))
    _check_same_reference(manifest, "abc", resume=True)
    _check_same_reference(manifest, "other", resume=False)  # a fresh run replaces the folder anyway
    with pytest.raises(UserError, match="cannot resume: the model, the init_from adapter or the tokenised data"):
        _check_same_reference(manifest, "other", resume=True)


def test_stale_reference_file_is_recomputed_and_a_matching_one_reused(tmp_path, tiny_model_dir, tokenizer):
    from edgetune.models import load_for_training
    from edgetune.preference import PreferenceData, load_or_compute_reference
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    rows = [parse_preference_row({"prompt": PROMPT, "chosen": msg("Paris."), "rejected": msg("Lyon.")}, "dpo", "f:1")]
    pairs, _ = tokenize_pairs(rows, tokenizer, 512, "left", 10**6)
    data = PreferenceData({"train": [pairs[0].chosen, pairs[0].rejected], "eval": []}, 2, {}, {}, {})
    model = load_for_training(str(tiny_model_dir)).model
    path = tmp_path / "reference_logps.safetensors"
    mx.save_safetensors(str(path), {"train": mx.array([0.0, 0.0])}, metadata={"fingerprint": "old"})
    said = []
    fresh = load_or_compute_reference(path, "new", model, data, 2, said.append)
    assert any("recomputing" in m for m in said) and np.all(fresh["train"] < 0)
    said.clear()
    again = load_or_compute_reference(path, "new", model, data, 2, said.append)
    assert any("reusing" in m for m in said) and not any("scored" in m for m in said)
    np.testing.assert_array_equal(again["train"], fresh["train"])


# --- the reference pass: shared prompts, and the chunked head of the training loss ---------------

def _model_with_random_lora(model_dir):
    """The tiny model + LoRA whose B is random (not zero), so the adapter changes every log-prob."""
    from mlx.utils import tree_flatten, tree_unflatten

    from edgetune.lora import LoraSpec, attach_lora
    from edgetune.models import load_for_training
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    loaded = load_for_training(str(model_dir))
    attach_lora(loaded.model, LoraSpec(4, 8.0), 0)
    rng = np.random.default_rng(0)
    loaded.model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                                        for k, v in tree_flatten(loaded.model.trainable_parameters())]))
    loaded.model.eval()
    return loaded


def _rows_sharing_prompts(tokenizer):
    """Pairs over two prompts of different lengths (three pairs share the long one), so batches mix
    prompt lengths and a prompt group can be larger than a batch."""
    short = [{"role": "user", "content": "Capital?"}]
    raw = [parse_preference_row({"prompt": PROMPT if i % 2 else short, "chosen": msg("Paris is it. " * (i + 1)),
                                 "rejected": msg("Lyon." * (3 - i % 3))}, "dpo", f"f:{i}") for i in range(5)]
    pairs, _ = tokenize_pairs(raw, tokenizer, 512, "left", 10**6)
    return [ex for p in pairs for ex in (p.chosen, p.rejected)]


def _fresh_logps(model, rows) -> np.ndarray:
    """Completion log-prob sums by the plain route: full logits of one unpadded row at a time,
    mlx-lm's own attention and exp (no edgetune kernels, no cache)."""
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    out = []
    for r in rows:
        logits = model(mx.array(r.tokens[None, :-1]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = np.array(mx.take_along_axis(lp, mx.array(r.tokens[1:])[:, None], axis=-1))[:, 0]
        out.append(picked[r.prompt_len - 1:].sum())
    return np.array(out)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shared_prompt_reference_equals_a_fresh_forward_of_each_row(arch, tiny_model_dir, tiny_llama_dir,
                                                                     monkeypatch):
    from mlx_lm.utils import load_tokenizer

    from edgetune import preference

    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    loaded = _model_with_random_lora(model_dir)
    rows = _rows_sharing_prompts(load_tokenizer(model_dir))
    fresh = _fresh_logps(loaded.model, rows)
    for batch_size in (1, 3, 16):
        got = preference.compute_reference(loaded.model, rows, batch_size, lambda m: None, "train")
        np.testing.assert_allclose(got, fresh, rtol=2e-7, atol=1e-5, err_msg=f"batch size {batch_size}")
    # A family not known to take per-row offsets is scored as whole rows: the same numbers.
    monkeypatch.setattr(preference, "SHARED_PROMPT_MODEL_TYPES", set())
    whole = preference.compute_reference(loaded.model, rows, 3, lambda m: None, "train")
    np.testing.assert_allclose(whole, fresh, rtol=2e-7, atol=1e-5)


def test_reference_batches_run_each_prompt_once_and_cover_every_row_once(tokenizer):
    from edgetune.preference import prompt_groups, reference_batches
    from edgetune.sft_data import TokenizedExample

    rows = _rows_sharing_prompts(tokenizer)
    groups = prompt_groups(rows)
    # Pairs 0, 2, 4 share the short prompt, pairs 1, 3 the long one: two prompts for ten rows.
    assert groups == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]]
    for batch_size in (1, 3, 16):
        batches = reference_batches(rows, batch_size)
        assert sorted(i for b in batches for g in b for i in g) == list(range(len(rows)))
        assert all(len(b) == 1 or sum(map(len, b)) <= batch_size for b in batches)
    # A prompt under 2 tokens has nothing before its first supervised position: it stays alone.
    bare = [TokenizedExample("a", np.array([5, 6, 7], np.int32), 1), TokenizedExample("b", np.array([5, 8], np.int32), 1)]
    assert prompt_groups(bare) == [[0], [1]]


def test_chunked_head_gives_the_full_head_loss_and_lora_gradients_compiled(tiny_model_dir, tokenizer):
    """sequence_logprobs' head recomputes the logits HEAD_CHUNK rows at a time in its backward pass;
    loss and every LoRA gradient must equal those of the plain full-logits head (sft.target_logprobs),
    inside a compiled step as the trainer runs it, with a position count that is no multiple of
    HEAD_CHUNK (> 2 chunks)."""
    from functools import partial

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from edgetune.kernels import training_kernels
    from edgetune.preference import HEAD_CHUNK, sequence_logprobs
    from edgetune.runtime import mlx_core
    from edgetune.sft import target_logprobs, to_micro_batch
    from edgetune.sft_data import collate

    mx = mlx_core()
    model = _model_with_random_lora(tiny_model_dir).model
    rows = _rows_sharing_prompts(tokenizer)
    tokens, select, targets, weights = to_micro_batch(collate([[r] for r in rows])).arrays[:4]
    n = int(np.array(weights).sum())
    assert n > 2 * HEAD_CHUNK and n % HEAD_CHUNK

    def chunked(tokens):
        return (sequence_logprobs(model, tokens, select, targets, weights)[0] * mx.arange(1, 11)).sum()

    def plain(tokens):
        lp = target_logprobs(model, tokens, select, targets) * weights
        per_row = mx.zeros((tokens.shape[0],), mx.float32).at[select // tokens.shape[1]].add(lp)
        return (per_row * mx.arange(1, 11)).sum()

    results = []
    with training_kernels(model):
        for loss in (chunked, plain):
            step = partial(mx.compile, inputs=[model.state], outputs=[model.state])(nn.value_and_grad(model, loss))
            value, grads = step(tokens)
            results.append((float(value), dict(tree_flatten(grads))))
    (v1, g1), (v2, g2) = results
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        # Chunked matmuls sum in another order: float32 rounding, relative to the tensor's scale.
        a, b = np.array(g1[k]), np.array(g2[k])
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), k
    assert any(np.abs(np.array(g)).max() > 0 for g in g1.values())


def test_reference_groups_cover_every_row_once_within_the_position_budget():
    from edgetune.preference import reference_groups

    lengths = [5, 300, 17, 64, 64, 1000, 9, 120, 33, 2000]
    groups = reference_groups(lengths, 1024, 8)
    assert sorted(i for g in groups for i in g) == list(range(10))
    for g in groups:
        width = -(-max(lengths[i] for i in g) // 8) * 8
        assert len(g) == 1 or len(g) * width <= 1024  # a row over the budget is a group of its own
    # Short rows share one call (5 ... 120: 7 x 120 positions); 300, 1000 and 2000 go alone.
    assert [sorted(lengths[i] for i in g) for g in groups] == [[5, 9, 17, 33, 64, 64, 120], [300], [1000], [2000]]
