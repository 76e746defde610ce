"""An MLX model folder: the base with the adapter merged, optionally quantized.

The folder is what `mlx_lm.load`, `mlx_lm.generate`, `mlx_lm.server` and LM
Studio take unchanged: config.json (with mlx-lm's `quantization` keys when
quantized), model.safetensors, the base's tokenizer files and chat template
copied byte for byte, and generation_config.json whose `eos_token_id` lists
every id that ends a turn (so servers stop at the end of the assistant's turn,
not only at the document end). Unquantized, it is also a Hugging Face
checkpoint (transformers loads it; the GGUF writer reads it).
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path
from typing import Callable

from edgetune.export.fuse import BaseModel, LoraAdapter, Quantization, output_config, write_fused_weights
from edgetune.fileio import write_json

# Tokenizer and chat-template files a model folder may carry (copied as they are).
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "*.tiktoken", "chat_template.json",
                      "chat_template.jinja")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for file in sorted(glob.glob(str(src / pattern))):
            shutil.copy2(file, dst / Path(file).name)
            copied.append(Path(file).name)
    return copied


def end_of_turn_ids(model_dir: Path) -> list[int]:
    """Ids that end an assistant turn: the tokenizer's EOS and the special token the chat
    template writes right after an assistant message (`<|im_end|>`, `<|eot_id|>` ...).

    Found by rendering a one-turn chat, so it holds for templates edgetune has
    never seen. Returns [] when the folder has no usable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # a tokenizer transformers cannot read: nothing to add
        return []
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if tok.chat_template:
        marker = "edgetune-end-of-turn-probe"
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that needs more (tools, system prompt): keep what we have
            text = ""
        after = text.split(marker, 1)[1] if marker in text else ""
        specials = sorted(tok.get_added_vocab().items(), key=lambda kv: -len(kv[0]))
        for token, token_id in specials:
            if after.lstrip(" ").startswith(token):
                ids.append(token_id)
                break
    return list(dict.fromkeys(ids))


def generation_config(base_dir: Path, config: dict) -> tuple[dict, list[int]]:
    """The base's generation_config.json with `eos_token_id` as a list that includes the
    end-of-turn ids; also returns the ids that were added."""
    path = base_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    listed = gen.get("eos_token_id", config.get("eos_token_id"))
    eos = [listed] if isinstance(listed, int) else list(listed or [])
    added = [i for i in end_of_turn_ids(base_dir) if i not in eos]
    gen["eos_token_id"] = eos + added
    return gen, added


def write_mlx_folder(base: BaseModel, adapter: LoraAdapter | None, quant: Quantization | None, out: Path,
                     echo: Callable[[str], None]) -> dict:
    """Write the merged (and quantized) model into the existing folder `out`; returns a summary.

    `out` is expected to be a fresh temp folder (the caller renames it into place).
    """
    stats = write_fused_weights(base, adapter, quant, out / "model.safetensors", echo)
    # From the file, not mlx-lm's loaded config (which has generation_config's eos ids merged in).
    config = output_config(json.loads((base.path / "config.json").read_text()), quant)
    write_json(out / "config.json", config)
    copied = copy_tokenizer_files(base.path, out)
    gen, added = generation_config(base.path, config)
    write_json(out / "generation_config.json", gen)
    if added:
        echo(f"generation_config.json: eos_token_id {gen['eos_token_id']} (added {added}: the chat template's "
             "end of turn)")
    return {"weights": stats, "tokenizer_files": copied, "eos_token_id": gen["eos_token_id"],
            "quantization": quant.as_config() if quant else None}
