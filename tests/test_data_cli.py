"""The `edgetune data` commands: real subprocesses for build/validate, and `stats`
with a real tokenizer trained in-process (no network)."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetune.cli import main
from edgetune.data.stats import dataset_stats, distribution

FIXTURES = Path(__file__).parent / "data" / "feedback"
SIGNALS = FIXTURES / "signals.jsonl"
INVALID = FIXTURES / "invalid.jsonl"


def edgetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed `edgetune` console script."""
    exe = shutil.which("edgetune", path=str(Path(sys.executable).parent)) or shutil.which("edgetune")
    assert exe, "the edgetune console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_build_from_gz_and_glob_inputs_prints_the_report(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(SIGNALS, logs / "a.jsonl")
    with gzip.open(logs / "b.jsonl.gz", "wb") as f:
        f.write(b'{"type": "feedback", "conversation_id": "c-none", "message_id": "m4", "rating": "up"}\n')
    run = edgetune("data", "build", "logs/*.jsonl*", "--out", "out", "--eval-fraction", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "1 thumbs up" in run.stdout and "orphaned feedback: 3" in run.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [i["path"] for i in report["inputs"]] == ["logs/a.jsonl", "logs/b.jsonl.gz"]
    # the split-out rating in the .gz file reached c-none's last answer
    sft = [json.loads(line) for line in (tmp_path / "out" / "train" / "sft.jsonl").read_text().splitlines()]
    assert ("c-none", ["m4"]) in [(r["source"]["conversation_id"], r["source"]["message_ids"]) for r in sft]


@pytest.mark.slow
def test_build_invalid_log_exits_2_with_located_errors_and_no_traceback(tmp_path):
    shutil.copy(INVALID, tmp_path / "bad.jsonl")
    run = edgetune("data", "build", "bad.jsonl", "--out", "out", cwd=tmp_path)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")):]  # after progress lines
    assert lines[0] == "error: bad.jsonl:2: not valid JSON (Expecting value at column 1)"
    assert "bad.jsonl:9: messages[1].role: unknown role 'bot' (expected system|user|assistant|tool)" in lines
    assert lines[-1] == ("19 invalid record(s); nothing was written. Fix them, or pass --skip-invalid "
                         "to build from the rest.")
    assert not (tmp_path / "out").exists()
    run = edgetune("data", "build", "bad.jsonl", "--out", "out", "--skip-invalid", cwd=tmp_path)
    assert run.returncode == 0 and "19 invalid (skipped)" in run.stdout


@pytest.mark.slow
def test_user_mistakes_exit_2_without_traceback(tmp_path):
    (tmp_path / "out").mkdir()
    for args, message in [
        (["data", "build", "missing.jsonl", "--out", "x"], "error: missing.jsonl: no such file"),
        (["data", "build", str(SIGNALS), "--out", "out"],
         "error: out: already exists; choose another --out or pass --force to replace it"),
        (["data", "stats", "nowhere"], "error: nowhere: no such folder"),
    ]:
        run = edgetune(*args, cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.startswith(message)


@pytest.mark.slow
def test_validate_prints_counts_and_exits_nonzero_on_errors(tmp_path):
    ok = edgetune("data", "validate", str(SIGNALS), cwd=tmp_path)
    assert ok.returncode == 0
    assert ok.stdout.strip() == ("19 records: 10 conversations (0 replaced by a later version), 6 feedback "
                                 "(1 for a conversation not in the log), 3 comparisons, 0 invalid")
    bad = edgetune("data", "validate", str(INVALID), cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"{INVALID}:21: preferred: 'c' is not a response id" in bad.stderr
    assert "2 conversations" in bad.stdout and "19 invalid" in bad.stdout


# --- stats -------------------------------------------------------------------------------------------

def test_distribution_nearest_rank():
    assert distribution(list(range(1, 11))) == {"min": 1, "p50": 5, "p90": 9, "p99": 10, "max": 10}
    assert distribution([7]) == {"min": 7, "p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert distribution([3, 1, 2]) == {"min": 1, "p50": 2, "p90": 3, "p99": 3, "max": 3}
    assert distribution([]) is None


def _dataset(folder: Path) -> Path:
    """A hand-written build folder whose token counts are easy to work out."""
    rows = {
        "train/sft": [{"prompt": [{"role": "user", "content": "Hi there"}],
                       "completion": [{"role": "assistant", "content": "Hello"}],
                       "source": {"rule": "thumbs_up", "persona": "analyst"}},
                      {"prompt": [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hi Hi there"}],
                       "completion": [{"role": "assistant", "content": "Hello there Hello"}],
                       "source": {"rule": "thumbs_up"}}],
        "train/dpo": [{"prompt": [{"role": "user", "content": "Hi"}],
                       "chosen": [{"role": "assistant", "content": "Hello there"}],
                       "rejected": [{"role": "assistant", "content": "Hi"}], "source": {"rule": "edit"}}],
        "train/kto": [], "eval/sft": [], "eval/dpo": [],
        "eval/kto": [{"prompt": [{"role": "user", "content": "Hi"}],
                      "completion": [{"role": "assistant", "content": "there"}], "label": False,
                      "source": {"rule": "thumbs_down", "persona": "novice"}}],
    }
    for name, items in rows.items():
        path = folder / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer with a plain chat template, trained in-process and saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "user", "assistant", "system", ":", "Hi", "there", "Hello"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    # "role: content" per message: 2 tokens of framing, then one token per word
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return folder


def test_stats_token_lengths_hand_worked(tmp_path, tokenizer_dir):
    from edgetune.data.stats import load_tokenizer

    stats = dataset_stats(_dataset(tmp_path), load_tokenizer(str(tokenizer_dir)))
    sft = stats["train/sft"]
    assert sft["rows"] == 2
    assert sft["personas"] == {"(none)": {"rows": 1, "share": 0.5}, "analyst": {"rows": 1, "share": 0.5}}
    # row 1: prompt "user: Hi there" + "assistant:" = 6 tokens, completion "Hello" = 1, total 7
    # row 2: prompt "system: Hi" (3) + "user: Hi Hi there" (5) + "assistant:" (2) = 10, completion 3, total 13
    assert sft["tokens"] == {"prompt": {"min": 6, "p50": 6, "p90": 10, "p99": 10, "max": 10},
                             "completion": {"min": 1, "p50": 1, "p90": 3, "p99": 3, "max": 3},
                             "total": {"min": 7, "p50": 7, "p90": 13, "p99": 13, "max": 13}}
    # dpo: prompt "user: Hi" + "assistant:" = 5; chosen 2, rejected 1; total = prompt + longer = 7
    assert {k: v["max"] for k, v in stats["train/dpo"]["tokens"].items()} == \
        {"prompt": 5, "chosen": 2, "rejected": 1, "total": 7}
    assert stats["train/kto"] == {"rows": 0, "personas": {}, "tokens": {}}
    assert stats["eval/kto"]["personas"] == {"novice": {"rows": 1, "share": 1.0}}


def test_stats_command_with_and_without_a_tokenizer(tmp_path, tokenizer_dir):
    folder = _dataset(tmp_path / "ds")
    runner = CliRunner()
    plain = runner.invoke(main, ["data", "stats", str(folder)])
    assert plain.exit_code == 0, plain.output
    assert "train/sft     2  (none) 50%, analyst 50%" in plain.output and "tokens" not in plain.output
    tokens = runner.invoke(main, ["data", "stats", str(folder), "--tokenizer", str(tokenizer_dir)])
    assert tokens.exit_code == 0, tokens.output
    assert "tokens (chat template applied)" in tokens.output
    assert "train/sft  total         7    7   13   13   13" in tokens.output


def test_stats_user_errors(tmp_path, tokenizer_dir):
    runner = CliRunner()
    (tmp_path / "half" / "train").mkdir(parents=True)
    result = runner.invoke(main, ["data", "stats", str(tmp_path / "half")])
    assert result.exit_code == 2
    assert "not a dataset folder of `edgetune data build` (missing train/sft.jsonl" in result.output
    folder = _dataset(tmp_path / "ds")
    result = runner.invoke(main, ["data", "stats", str(folder), "--tokenizer", str(tmp_path / "no-tokenizer")])
    assert result.exit_code == 2 and "cannot load it" in result.output
    (folder / "train" / "sft.jsonl").write_text('{"prompt": []}\nnot json\n')
    result = runner.invoke(main, ["data", "stats", str(folder)])
    assert result.exit_code == 2 and "train/sft.jsonl:2: not valid JSON" in result.output
