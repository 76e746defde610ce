"""The shared training loop: accumulation, compile, guards, checkpoints and exact resume."""

import math

import numpy as np
import pytest

from edgetune import checkpoint as ckpt
from edgetune.errors import UserError
from edgetune.lora import LoraSpec, attach_lora, save_adapter
from edgetune.runtime import mlx_core
from edgetune.sft import sft_loss_fn, to_micro_batch
from edgetune.sft_data import TokenizedExample, collate
from edgetune.backends.mlx_backend import MLXBackend, accumulate, make_grad_step
from edgetune.trainer import LoopSettings, MicroBatch, restore, train
from tests.mlx_models import make_model

mx = mlx_core()
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402


def lora_model(lora_seed=0):
    model = make_model("llama", seed=0)
    cfg = attach_lora(model, LoraSpec(rank=4, alpha=8), seed=lora_seed)
    # Non-zero B so that gradients reach A too (LoRA starts with B = 0).
    for layer in model.layers:
        q = layer.self_attn.q_proj
        q.lora_b = mx.full(q.lora_b.shape, 0.01)
    mx.eval(model.parameters())
    return model, cfg


def examples(n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 20))
        toks = rng.integers(1, 97, length).astype(np.int32)
        out.append(TokenizedExample(f"ex{i}", toks, int(rng.integers(2, length - 2))))
    return out


def flat(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_batch4_accum1_equals_batch1_accum4_on_variable_length_rows():
    model, _ = lora_model()
    exs = examples(4)
    step = make_grad_step(model, sft_loss_fn)
    one_batch = [to_micro_batch(collate([[e] for e in exs]))]
    four_batches = [to_micro_batch(collate([[e]])) for e in exs]
    loss_a, n_a, g_a = accumulate(step, one_batch)
    loss_b, n_b, g_b = accumulate(step, four_batches)
    assert float(n_a) == float(n_b) == sum(len(e.tokens) - e.prompt_len for e in exs)
    assert math.isclose(float(loss_a), float(loss_b), rel_tol=1e-5)
    ga, gb = flat(g_a), flat(g_b)
    assert any(np.abs(v).sum() > 0 for v in ga.values())
    for k in ga:
        np.testing.assert_allclose(ga[k] / float(n_a), gb[k] / float(n_b), atol=1e-6, rtol=1e-4, err_msg=k)


def _loop(model, steps, compile=True, nan_at=(), tmp=None, state=None, optimizer=None, settings_kw=None):
    exs = examples(8, seed=1)
    batches = [to_micro_batch(collate([[e, f]])) for e, f in zip(exs[::2], exs[1::2])]

    def micro_batch(cursor):
        b = batches[cursor % len(batches)]
        if cursor in nan_at:
            # A corrupt batch: weights of NaN make the loss non-finite.
            arrays = b.arrays[:3] + (b.arrays[3] * float("nan"),) + b.arrays[4:]
            return MicroBatch(arrays, b.n_tokens, [f"bad{cursor}"], b.compile_key)
        return b

    optimizer = optimizer or optim.Adam(learning_rate=1e-2)
    if state is None:
        optimizer.init(model.trainable_parameters())
        state = ckpt.TrainerState(0, 0)
    losses = []
    settings = LoopSettings(steps=steps, save_every=3, log_every=100, compile=compile, **(settings_kw or {}))
    state = train(MLXBackend(), model, optimizer, sft_loss_fn, micro_batch, settings, tmp, lambda f: save_adapter(model, _cfg, f),
                  state, report=lambda r: losses.append(r.get("loss")), echo=lambda m: None)
    return losses, state, optimizer


_cfg = {}


def test_compiled_step_updates_weights_and_matches_eager(tmp_path):
    start = flat(lora_model()[0].trainable_parameters())
    m1, _ = lora_model()
    l1, _, _ = _loop(m1, 4, compile=True, tmp=tmp_path / "a")
    m2, _ = lora_model()
    l2, _, _ = _loop(m2, 4, compile=False, tmp=tmp_path / "b")
    w1, w2 = flat(m1.trainable_parameters()), flat(m2.trainable_parameters())
    assert any(not np.allclose(w1[k], start[k]) for k in w1), "compiled training did not change the LoRA weights"
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], atol=1e-5, err_msg=k)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)


def test_nonfinite_step_is_skipped_and_reported(tmp_path):
    model, _ = lora_model()
    msgs = []
    exs = examples(2)
    b = to_micro_batch(collate([[exs[0], exs[1]]]))
    bad = MicroBatch(b.arrays[:3] + (b.arrays[3] * float("nan"),) + b.arrays[4:], b.n_tokens, ["row-7"])
    optimizer = optim.Adam(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    before = flat(model.trainable_parameters())
    records = []
    train(MLXBackend(), model, optimizer, sft_loss_fn, lambda c: bad if c == 0 else b, LoopSettings(steps=1, save_every=0),
          tmp_path, lambda f: None, ckpt.TrainerState(0, 0), report=records.append, echo=msgs.append)
    after = flat(model.trainable_parameters())
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert records[0]["skipped"] and records[0]["examples"] == ["row-7"]
    assert any("step 1" in m and "row-7" in m for m in msgs)


def test_training_stops_after_k_nonfinite_steps_in_a_row(tmp_path):
    model, _ = lora_model()
    with pytest.raises(UserError, match="3 non-finite steps in a row"):
        _loop(model, 10, nan_at=set(range(100)), tmp=tmp_path, settings_kw={"max_nonfinite_steps": 3})


def test_resume_from_checkpoint_gives_identical_weights_and_losses(tmp_path):
    full_model, _ = lora_model()
    full_losses, _, _ = _loop(full_model, 6, tmp=tmp_path / "full")

    part_model, _ = lora_model()
    part_losses, _, _ = _loop(part_model, 3, tmp=tmp_path / "part")
    # A fresh process: new model and optimizer, everything restored from disk.
    resumed, _ = lora_model(lora_seed=123)  # different LoRA init: restore must overwrite it
    opt = optim.Adam(learning_rate=1e-2)
    folder = ckpt.latest_valid(tmp_path / "part", warn=print)
    assert folder.name == "step-0000003"
    state = restore(MLXBackend(), folder, resumed, opt)
    rest, _, _ = _loop(resumed, 6, tmp=tmp_path / "part", state=state, optimizer=opt)
    np.testing.assert_allclose(part_losses + rest, full_losses, rtol=0, atol=1e-6)
    w_full, w_res = flat(full_model.trainable_parameters()), flat(resumed.trainable_parameters())
    for k in w_full:
        np.testing.assert_allclose(w_res[k], w_full[k], atol=1e-6, err_msg=k)


def test_truncated_checkpoint_file_is_skipped_with_warning(tmp_path):
    model, _ = lora_model()
    _loop(model, 6, tmp=tmp_path)
    newest = ckpt.list_checkpoints(tmp_path)[0]
    data = (newest / "adapters.safetensors").read_bytes()
    (newest / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    warnings = []
    found = ckpt.latest_valid(tmp_path, warn=warnings.append)
    assert found.name == "step-0000003"
    assert "step-0000006" in warnings[0] and "checksum" in warnings[0]


def test_keep_last_n_checkpoints(tmp_path):
    model, _ = lora_model()
    _loop(model, 9, tmp=tmp_path, settings_kw={"keep_checkpoints": 2})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000009", "step-0000006"]
