"""Write the Ollama `Modelfile` that goes next to an exported GGUF file.

Ollama does not run the Jinja chat template stored in the GGUF; it needs a Go
template. The two chat layouts edgetune's architectures use are translated to
the templates Ollama's own library uses for those families (system prompt
from `.System`, then user/assistant turns from `.Messages`, the last assistant
turn left open so a prefilled answer is continued):

- ChatML (Qwen2/Qwen2.5): `<|im_start|>role\\n...<|im_end|>\\n`;
- Llama 3: `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`; no
  `<|begin_of_text|>` in the template, because llama.cpp adds the BOS itself
  (the GGUF says add_bos_token). Unlike the Jinja template, Go templates
  cannot `trim` the message text, so surrounding whitespace is kept.

Any other template: the Modelfile gets FROM and the stop tokens plus a
comment saying TEMPLATE must be written by hand, and a warning is echoed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgetune.export.gguf import read_special_tokens
from edgetune.fileio import atomic_write

CHATML_TEMPLATE = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}"""

LLAMA3_TEMPLATE = """\
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- end }}"""

# family -> (tokens the Jinja template must contain, Go template, turn-start tokens).
# Turn starts are extra stops, as in Ollama's own Modelfiles: a model that skips
# its end-of-turn token still stops before writing the user's next turn.
FAMILIES = {
    "chatml": (("<|im_start|>", "<|im_end|>"), CHATML_TEMPLATE, ("<|im_start|>",)),
    "llama3": (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), LLAMA3_TEMPLATE,
               ("<|start_header_id|>",)),
}


def chat_family(chat_template: str | None) -> str | None:
    """`chatml`, `llama3`, or None when the Jinja template is neither (or missing)."""
    for family, (markers, _, _) in FAMILIES.items():
        if chat_template and all(m in chat_template for m in markers):
            return family
    return None


def write_modelfile(out_dir: Path, gguf_name: str, tokenizer_dir: Path,
                    echo: Callable[[str], None] = print) -> Path:
    """Write `out_dir/Modelfile` for the GGUF file `out_dir/gguf_name`; return its path.

    `tokenizer_dir` holds tokenizer.json, tokenizer_config.json (the chat
    template) and generation_config.json (the stop tokens). The stops are the
    eos and every other end-of-generation id those files list, plus the
    family's turn-start token. An unknown chat template is echoed as a warning.
    """
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    special = read_special_tokens(tokenizer_dir)
    family = chat_family(special.chat_template)
    stops = [text for text in map(special.text, special.stops) if text is not None]
    lines = ["# Ollama Modelfile written by edgetune. In this folder: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    if family is None:
        lines += ["# TEMPLATE: edgetune could not translate this model's chat template to Ollama's Go syntax;",
                  "# write a TEMPLATE \"\"\"...\"\"\" block here before `ollama create` (Ollama docs: modelfile.md)."]
        echo(f"warning: {tokenizer_dir}: chat template is neither ChatML nor Llama 3; "
             f"{out_dir / 'Modelfile'} has no TEMPLATE, fill it in before `ollama create`")
    else:
        _, template, turn_starts = FAMILIES[family]
        lines.append(f'TEMPLATE """{template}"""')
        stops += [t for t in turn_starts if t in special.ids]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    path = out_dir / "Modelfile"
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return path
