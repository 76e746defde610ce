"""LangSmith exports (runs and feedback, JSONL) read as v1 records.

A line is a **run** when it has `run_type` or `inputs`, and **feedback** when
it has `key` and `run_id` or `trace_id`. Field names follow LangSmith's run
and feedback data formats (`Run`, `Feedback` in the SDK schemas).

Run -> `conversation` (`conversation_id` = `id`, `timestamp` = `start_time`):
- prompt from `inputs`: `messages` as OpenAI-style dicts, LangChain
  serialised messages (`{"lc": 1, "id": [..., "HumanMessage"], "kwargs":
  {...}}`) or `{"type": "human", "content"| "data": ...}`; a chat-model
  batch (`[[...]]`) must hold one conversation. Else `prompts: [one string]`,
  else the one string value of `inputs` (`{"question": "..."}`), as a user
  message. Messages get ids `m1`, `m2`, ...
- the assistant message `"output"` from `outputs`: `generations[0][0]`
  (its message, else its `text`), `choices[0].message`, `output` (a string
  or message), the last of `messages` (LangGraph state, must be the AI's),
  a message itself (`content`), else the one string value of `outputs`.
- `persona` = `extra.metadata.persona` (or a top-level `metadata.persona`).
- `metadata` = `{"source": "langsmith", "run_type", "name", "trace_id",
  "session_id"}`, those the run has.
- Every convertible run becomes a conversation, child runs included; only
  the one that feedback names gets rows (unrated conversations give none).
  `retriever`, `tool`, `embedding`, `parser` and `prompt` runs hold no
  answer and are invalid lines: export `llm` and `chain` runs.

Feedback -> `feedback` on message `"output"` of run `run_id` (or, without
`run_id`, of `trace_id`, which is the root run's id):
- `score` (or, without it, a number/boolean `value`): read as a 0..1 score
  or a -1/1 vote, `>= 0.5` is up, lower is down; outside [-1, 1] is invalid.
  A string `value` must be a rating label (up/down, thumbs_up, good/bad,
  correct/incorrect, yes/no, ...), or the line is invalid.
- `correction`: a string is the corrected output (`edited_content`); an
  object is read like run `outputs` (`{"output": ...}`, `{"outputs": {...}}`,
  a message, ...), except `{"score": x}` alone, which is an evaluator-score
  correction and replaces `score`.
- `comment` -> `comment`; `created_at` -> `timestamp`. Feedback with none
  of score, value, correction or comment is invalid.
- The feedback `key` is not interpreted: every score counts as a rating, so
  export only the keys that are human ratings of the answer.
"""

from __future__ import annotations

from typing import Iterator

from edgetune.data.importers._common import (
    OUTPUT_ID, Bad, chat_message, describe, numbered, optional_object, optional_str, rating_from_label,
    rating_from_number, required_str, text_content,
)
from edgetune.data.source import Invalid

# LangChain message classes and `type` tags -> v1 roles.
_LC_ROLES = {"HumanMessage": "user", "human": "user", "AIMessage": "assistant", "ai": "assistant",
             "AIMessageChunk": "assistant", "SystemMessage": "system", "system": "system",
             "ToolMessage": "tool", "tool": "tool", "FunctionMessage": "tool", "function": "tool"}

# Spans inside a trace that never hold an assistant's answer.
_NOT_CHAT_RUNS = frozenset({"retriever", "tool", "embedding", "parser", "prompt"})


def records_from_line(obj: dict, line_id: str) -> Iterator[dict | Invalid]:
    """The v1 record of one decoded export line (`line_id` is unused: ids come from LangSmith)."""
    try:
        if "run_type" in obj or "inputs" in obj:
            yield run_to_conversation(obj)
        elif "key" in obj and ("run_id" in obj or "trace_id" in obj):
            yield feedback_to_feedback(obj)
        else:
            raise Bad("expected a LangSmith run (id, inputs, outputs) or feedback (run_id, key, score); "
                      f"got keys {', '.join(sorted(obj)) or 'none'}")
    except Bad as e:
        yield Invalid(str(e))


def run_to_conversation(run: dict) -> dict:
    """A v1 `conversation` from a LangSmith run; raises `Bad`."""
    run_id = required_str(run, "id")
    run_type = run.get("run_type")
    if run_type in _NOT_CHAT_RUNS:
        raise Bad(f"run_type: {run_type!r} runs are not chat turns; export llm and chain runs "
                  "(or pass --skip-invalid to count and skip these)")
    inputs = run.get("inputs")
    if type(inputs) is not dict:
        raise Bad(f"inputs: expected an object, got {describe(inputs)}")
    outputs = run.get("outputs")
    if outputs is None:
        raise Bad("outputs: missing; the run has no output (did it fail or is it still running?)")
    if type(outputs) is not dict:
        raise Bad(f"outputs: expected an object, got {describe(outputs)}")
    extra_metadata = optional_object(optional_object(run, "extra"), "metadata", "extra.")
    persona = (optional_str(extra_metadata, "persona", "extra.metadata.")
               or optional_str(optional_object(run, "metadata"), "persona", "metadata."))
    messages = numbered(_input_turns(inputs))
    messages.append({"id": OUTPUT_ID, "role": "assistant", "content": output_text(outputs, "outputs")})
    record = {"type": "conversation", "conversation_id": run_id}
    if persona:
        record["persona"] = persona
    if (timestamp := optional_str(run, "start_time")) is not None:
        record["timestamp"] = timestamp
    record["metadata"] = {"source": "langsmith"}
    for key in ("run_type", "name", "trace_id", "session_id"):
        if (value := optional_str(run, key)) is not None:
            record["metadata"][key] = value
    record["messages"] = messages
    return record


def _message(m, where: str) -> tuple[str, str]:
    """`(role, content)` of an OpenAI-style or LangChain-serialised message."""
    if type(m) is dict and "role" not in m:
        if m.get("lc") == 1 and type(m.get("id")) is list and m["id"]:
            kind, fields = m["id"][-1], optional_object(m, "kwargs", f"{where}.")
            where = f"{where}.kwargs"
        else:  # {"type": "human", "content": ...} or {"type": "human", "data": {...}}
            kind = m.get("type")
            fields = optional_object(m, "data", f"{where}.") if "data" in m else m
            where = f"{where}.data" if "data" in m else where
        if kind not in _LC_ROLES:
            raise Bad(f"{where}: unknown message type {kind!r} (expected a human, ai, system or tool message)")
        if fields.get("tool_calls"):
            raise Bad(f"{where}.tool_calls: assistant tool calls are not supported (v1 messages are text)")
        return _LC_ROLES[kind], text_content(fields.get("content"), f"{where}.content")
    return chat_message(m, where)


def _input_turns(inputs: dict) -> list[tuple[str, str]]:
    if "messages" in inputs:
        messages = inputs["messages"]
        if type(messages) is list and messages and type(messages[0]) is list:  # a chat-model batch
            if len(messages) != 1:
                raise Bad(f"inputs.messages: a batch of {len(messages)} conversations; "
                          "export runs that hold one")
            messages, where = messages[0], "inputs.messages[0]"
        else:
            where = "inputs.messages"
        if type(messages) is not list or not messages:
            raise Bad(f"{where}: expected a non-empty list of messages, got {describe(messages)}")
        return [_message(m, f"{where}[{i}]") for i, m in enumerate(messages)]
    if "prompts" in inputs:
        prompts = inputs["prompts"]
        if type(prompts) is not list or len(prompts) != 1 or type(prompts[0]) is not str:
            raise Bad("inputs.prompts: expected a list of one prompt string")
        return [("user", prompts[0])]
    texts = [(k, v) for k, v in inputs.items() if type(v) is str]
    if len(texts) != 1:
        raise Bad("inputs: no chat messages found (expected `messages`, `prompts` or a single text input, "
                  f"got keys {', '.join(sorted(inputs)) or 'none'})")
    return [("user", texts[0][1])]


def output_text(outputs, where: str) -> str:
    """The assistant's text in a run's `outputs` (or a correction shaped like them); raises `Bad`."""
    if type(outputs) is str:
        return outputs
    if type(outputs) is not dict:
        raise Bad(f"{where}: expected an object or a string, got {describe(outputs)}")
    if "generations" in outputs:
        generations = outputs["generations"]
        first = generations[0] if type(generations) is list and generations else None
        if type(first) is list:  # one list of candidates per prompt
            first = first[0] if first else None
        if type(first) is not dict:
            raise Bad(f"{where}.generations: expected [[{{text, message}}]], got {describe(generations)}")
        if "message" in first:
            return _assistant_text(first["message"], f"{where}.generations[0][0].message")
        return text_content(first.get("text"), f"{where}.generations[0][0].text")
    if "choices" in outputs:
        choices = outputs["choices"]
        if type(choices) is not list or not choices or type(choices[0]) is not dict:
            raise Bad(f"{where}.choices: expected a non-empty list of choices")
        return _assistant_text(choices[0].get("message"), f"{where}.choices[0].message")
    if "output" in outputs:
        return _assistant_text(outputs["output"], f"{where}.output")
    if "outputs" in outputs:
        return output_text(outputs["outputs"], f"{where}.outputs")
    if "messages" in outputs:
        messages = outputs["messages"]
        if type(messages) is not list or not messages:
            raise Bad(f"{where}.messages: expected a non-empty list of messages")
        return _assistant_text(messages[-1], f"{where}.messages[{len(messages) - 1}]")
    if "content" in outputs:
        return _assistant_text(outputs, where)
    texts = [v for v in outputs.values() if type(v) is str]
    if len(texts) != 1:
        raise Bad(f"{where}: no assistant output found (expected generations, choices, output, messages, "
                  f"content or a single text; got keys {', '.join(sorted(outputs)) or 'none'})")
    return texts[0]


def _assistant_text(message, where: str) -> str:
    if type(message) is str:
        return message
    role, content = _message(message, where)
    if role != "assistant":
        raise Bad(f"{where}: expected the assistant's message, got a {role} message")
    return content


def feedback_to_feedback(feedback: dict) -> dict:
    """A v1 `feedback` record from LangSmith feedback; raises `Bad`."""
    if feedback.get("run_id") is not None:
        run_id = required_str(feedback, "run_id")
    else:
        run_id = required_str(feedback, "trace_id")
    key = feedback.get("key")
    record = {"type": "feedback", "conversation_id": run_id, "message_id": OUTPUT_ID}
    score, value, correction = feedback.get("score"), feedback.get("value"), feedback.get("correction")
    if type(correction) is dict and set(correction) == {"score"}:  # an evaluator's score, corrected
        score, correction = correction["score"], None
    if score is not None:
        record["rating"] = rating_from_number(score, "score")
    elif type(value) is str:
        record["rating"] = rating_from_label(value, f"value (feedback {key!r})")
    elif value is not None:
        record["rating"] = rating_from_number(value, "value")
    if correction is not None:
        text = output_text(correction, "correction")
        if not text.strip():
            raise Bad("correction: the corrected output is empty")
        record["edited_content"] = text
    if (comment := optional_str(feedback, "comment")) is not None:
        record["comment"] = comment
    if len(record) == 3:
        raise Bad(f"score: feedback {key!r} has no score, value, correction or comment")
    if (timestamp := optional_str(feedback, "created_at")) is not None:
        record["timestamp"] = timestamp
    return record
