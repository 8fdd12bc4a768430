"""TRL dataset formats -> normalised preference and SFT records, each one validated.

Preference rows (https://huggingface.co/docs/trl/dataset_formats) need ``chosen`` and ``rejected``:

* standard: ``prompt``, ``chosen``, ``rejected`` strings;
* conversational: the same fields as lists of ``{"role", "content"}`` messages, rendered with the
  tokenizer's chat template: prompt text = template(prompt, add_generation_prompt=True); a
  response's text = template(prompt + response) with the prompt text removed from its front;
* implicit prompt: no ``prompt`` (or, as in TRL, a string ``prompt`` beside conversational
  responses, which is then ignored); ``chosen`` and ``rejected`` are whole conversations or whole
  strings and the prompt is what they share: for conversations the common leading messages; for
  strings the longest common character prefix cut back to its last whitespace character, which
  stays on the responses (as TRL's ``extract_prompt`` leaves the separating space on them);
* several rejected responses: ``rejected`` a list of strings or a list of conversations.

SFT rows: ``prompt`` + ``completion`` (strings, or message lists rendered as above); ``messages``
(the final message, which must be the assistant's, is the completion, the rest the prompt); or
GSM8K's ``question`` + ``answer`` (prompt :func:`miopt.tasks.gsm8k.gsm8k_prompt`, completion the answer).

Every record is checked before anything is returned; a bad one raises ``DataError`` naming its
file, line or record, and field, or with ``skip_invalid`` is counted in the ``LoadReport``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from miopt.data.sources import RawRow, kind_of, read_rows
from miopt.errors import DataError
from miopt.tasks.gsm8k import gsm8k_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_REPORTED_REASONS = 5  # skipped records whose reasons the LoadReport keeps

Messages = list[dict[str, Any]]
RecordT = TypeVar("RecordT")


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str  # prompt text, chat template already applied for conversational data (with add_generation_prompt=True)
    chosen: str  # response text only (no prompt)
    rejected: tuple[str, ...]  # one or more rejected response texts
    source: str  # "path:line" (JSONL) or "path:record N" (other formats) for messages


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    completion: str
    source: str


@dataclass
class LoadReport:
    path: str
    total: int
    kept: int
    skipped: int
    skipped_reasons: list[str] = field(default_factory=list)  # the first MAX_REPORTED_REASONS

    def summary(self) -> str:
        """One line: ``kept K of N records from PATH (skipped S; first: REASON)``."""
        text = f"kept {self.kept} of {self.total} records from {self.path}"
        if self.skipped:
            text += f" (skipped {self.skipped}; first: {self.skipped_reasons[0]})"
        return text


class _SetupError(DataError):
    """Conversational data without a usable tokenizer: a set-up problem, never skipped."""


def load_preference_records(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    skip_invalid: bool = False,
    split: str = "train",
) -> tuple[list[PreferenceRecord], LoadReport]:
    """Read and validate every preference record of ``source`` (see the module docstring)."""
    renderer = _ChatRenderer(tokenizer)
    return _load(source, split, skip_invalid, lambda row, where: _preference(row, where, renderer))


def load_sft_records(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    skip_invalid: bool = False,
    split: str = "train",
) -> tuple[list[SFTRecord], LoadReport]:
    """Read and validate every SFT record of ``source`` (see the module docstring)."""
    renderer = _ChatRenderer(tokenizer)
    return _load(source, split, skip_invalid, lambda row, where: _sft(row, where, renderer))


def parse_preference_row(
    row: dict[str, Any], source: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreferenceRecord:
    """One row in any preference format -> its record; raises ``DataError`` if it is invalid."""
    return _preference(row, source, _ChatRenderer(tokenizer))


def parse_sft_row(
    row: dict[str, Any], source: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> SFTRecord:
    """One row in any SFT format -> its record; raises ``DataError`` if it is invalid."""
    return _sft(row, source, _ChatRenderer(tokenizer))


def _load(
    source: str | Path, split: str, skip_invalid: bool, parse: Callable[[dict[str, Any], str], RecordT]
) -> tuple[list[RecordT], LoadReport]:
    """Parse every row; the first bad one raises unless ``skip_invalid``; none kept is always an error."""
    name, rows = read_rows(source, split=split)
    records: list[RecordT] = []
    reasons: list[str] = []
    for row in rows:
        try:
            records.append(_parse_row(row, parse))
        except _SetupError:
            raise
        except DataError as error:
            if not skip_invalid:
                raise
            if len(reasons) < MAX_REPORTED_REASONS:
                reasons.append(str(error))
    report = LoadReport(name, len(rows), len(records), len(rows) - len(records), reasons)
    if not records:
        raise DataError(
            f"no valid records: all {len(rows)} were invalid; the first: {reasons[0]}", source=name
        )
    return records, report


def _parse_row(row: RawRow, parse: Callable[[dict[str, Any], str], RecordT]) -> RecordT:
    if row.error is not None:
        raise row.error
    assert row.values is not None
    return parse(row.values, row.location)


# ----------------------------------------------------------------------------------------- preference


def _preference(row: dict[str, Any], where: str, renderer: _ChatRenderer) -> PreferenceRecord:
    if "chosen" not in row and {"completion", "label"} <= set(row):
        raise DataError(
            "missing: unpaired preference rows (prompt, completion, label) are not supported; "
            "give chosen and rejected",
            source=where,
            field="chosen",
        )
    chosen_kind, chosen = _classify(_require(row, "chosen", where), "chosen", where)
    rejected_kind, rejected = _classify_rejected(_require(row, "rejected", where), where)
    if rejected_kind != chosen_kind:
        raise DataError(
            f"is {_describe(rejected_kind)} but chosen is {_describe(chosen_kind)}; they must have the same format",
            source=where,
            field="rejected",
        )
    prompt_kind, prompt = _classify(row["prompt"], "prompt", where) if "prompt" in row else ("", None)

    if chosen_kind == "text":
        if prompt_kind == "messages":
            raise DataError(
                "is a string but prompt is a list of messages; give both as strings or both as messages",
                source=where,
                field="chosen",
            )
        _check_texts(chosen, rejected, where)
        if prompt_kind == "text":
            return PreferenceRecord(prompt, chosen, tuple(text for _, text in rejected), where)
        prompt, responses = _split_text_prompt([chosen] + [text for _, text in rejected], where)
        _check_texts(responses[0], list(zip([name for name, _ in rejected], responses[1:])), where)
        return PreferenceRecord(prompt, responses[0], tuple(responses[1:]), where)

    renderer.check(where, "chosen")
    for field_name, messages in rejected:
        if _message_key(messages) == _message_key(chosen):
            raise DataError("is identical to chosen", source=where, field=field_name)
    if prompt_kind == "messages":
        prompt_messages, responses = prompt, [("chosen", chosen)] + rejected
    else:  # implicit prompt (a string prompt beside conversational responses is ignored, as in TRL)
        prompt_messages, responses = _split_message_prompt(
            [("chosen", chosen)] + rejected, where, prompt_given=bool(prompt_kind)
        )
    for field_name, messages in responses:
        if not "".join(message["content"] for message in messages).strip():
            raise DataError("is empty: its messages have no content", source=where, field=field_name)
    prompt_text, texts = renderer.split(prompt_messages, responses, where)
    _check_texts(texts[0], list(zip([name for name, _ in rejected], texts[1:])), where)
    return PreferenceRecord(prompt_text, texts[0], tuple(texts[1:]), where)


def _check_texts(chosen: str, rejected: list[tuple[str, str]], where: str) -> None:
    """Chosen and every rejected non-empty after strip, and no rejected equal to chosen (after strip)."""
    if not chosen.strip():
        raise DataError("is empty", source=where, field="chosen")
    for field_name, text in rejected:
        if not text.strip():
            raise DataError("is empty", source=where, field=field_name)
        if text.strip() == chosen.strip():
            raise DataError("is identical to chosen", source=where, field=field_name)


def _split_text_prompt(texts: list[str], where: str) -> tuple[str, list[str]]:
    """Implicit string prompt: the common prefix up to (not including) its last whitespace character."""
    shared = texts[0]
    for text in texts[1:]:
        length = 0
        for a, b in zip(shared, text):
            if a != b:
                break
            length += 1
        shared = shared[:length]
    cut = max((index for index, character in enumerate(shared) if character.isspace()), default=0)
    prompt = shared[:cut]
    if not prompt.strip():
        raise DataError(
            "missing: no prompt field, and chosen and rejected share no leading text (up to a whitespace) "
            "to take as the implicit prompt",
            source=where,
            field="prompt",
        )
    return prompt, [text[cut:] for text in texts]


def _split_message_prompt(
    conversations: list[tuple[str, Messages]], where: str, *, prompt_given: bool
) -> tuple[Messages, list[tuple[str, Messages]]]:
    """Implicit conversational prompt: the leading messages all conversations share."""
    keys = [_message_key(messages) for _, messages in conversations]
    shared = 0
    while all(shared < len(key) for key in keys) and all(key[shared] == keys[0][shared] for key in keys):
        shared += 1
    if shared == 0:
        given = "is a string beside conversational responses, so" if prompt_given else "is absent, so"
        raise DataError(
            f"{given} the prompt must be the leading messages chosen and rejected share (TRL's implicit "
            "prompt), but they share none; give prompt as a list of messages",
            source=where,
            field="prompt",
        )
    responses = [(name, messages[shared:]) for name, messages in conversations]
    for name, messages in responses:
        if not messages:
            raise DataError("is empty: it has no messages beyond the shared prompt", source=where, field=name)
    return conversations[0][1][:shared], responses


# ----------------------------------------------------------------------------------------------- SFT


def _sft(row: dict[str, Any], where: str, renderer: _ChatRenderer) -> SFTRecord:
    if "messages" in row:
        kind, messages = _classify(row["messages"], "messages", where)
        if kind != "messages":
            raise DataError("must be a list of messages, got a string", source=where, field="messages")
        last = len(messages) - 1
        if messages[last]["role"] != "assistant":
            raise DataError(
                f"the last message must be the assistant's completion, got role {messages[last]['role']!r}",
                source=where,
                field=f"messages[{last}].role",
            )
        if last == 0:
            raise DataError("has no prompt message before the assistant's", source=where, field="messages")
        if not messages[last]["content"].strip():
            raise DataError("is empty", source=where, field=f"messages[{last}].content")
        renderer.check(where, "messages")
        prompt, texts = renderer.split(messages[:last], [(f"messages[{last}]", messages[last:])], where)
        return SFTRecord(prompt, texts[0], where)

    if "prompt" in row or "completion" in row:
        prompt_kind, prompt = _classify(_require(row, "prompt", where), "prompt", where)
        completion_kind, completion = _classify(_require(row, "completion", where), "completion", where)
        if completion_kind != prompt_kind:
            raise DataError(
                f"is {_describe(completion_kind)} but prompt is {_describe(prompt_kind)}; "
                "they must have the same format",
                source=where,
                field="completion",
            )
        if completion_kind == "text":
            if not completion.strip():
                raise DataError("is empty", source=where, field="completion")
            return SFTRecord(prompt, completion, where)
        if not "".join(message["content"] for message in completion).strip():
            raise DataError("is empty: its messages have no content", source=where, field="completion")
        renderer.check(where, "completion")
        prompt_text, texts = renderer.split(prompt, [("completion", completion)], where)
        return SFTRecord(prompt_text, texts[0], where)

    if "question" in row or "answer" in row:
        question = _nonempty_string(row, "question", where)
        answer = _nonempty_string(row, "answer", where)
        # The prompt of miopt.tasks.gsm8k (as in evaluation); the completion is the stripped answer.
        return SFTRecord(gsm8k_prompt(question), answer.strip(), where)

    raise DataError(
        "missing: SFT rows need prompt and completion, messages, or question and answer (GSM8K); "
        f"{_fields_of(row)}",
        source=where,
        field="prompt",
    )


def _nonempty_string(row: dict[str, Any], name: str, where: str) -> str:
    value = _require(row, name, where)
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {kind_of(value)}", source=where, field=name)
    if not value.strip():
        raise DataError("is empty", source=where, field=name)
    return value


# --------------------------------------------------------------------------------- values and messages


def _require(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise DataError(f"missing; {_fields_of(row)}", source=where, field=name)
    return row[name]


def _fields_of(row: dict[str, Any]) -> str:
    return f"the record has fields {', '.join(map(str, row))}" if row else "the record has no fields"


def _describe(kind: str) -> str:
    return "a list of messages" if kind == "messages" else "a string"


def _classify(value: Any, name: str, where: str) -> tuple[str, Any]:
    """``("text", str)`` or ``("messages", validated messages)``; anything else raises."""
    if isinstance(value, str):
        return "text", value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "messages", _messages(value, name, where)
    if isinstance(value, list) and not value:
        raise DataError("is an empty list", source=where, field=name)
    got = f"a list of {kind_of(value[0])}" if isinstance(value, list) else kind_of(value)
    raise DataError(
        f'must be a string or a list of {{"role", "content"}} messages, got {got}', source=where, field=name
    )


def _classify_rejected(value: Any, where: str) -> tuple[str, list[tuple[str, Any]]]:
    """One rejected response or several: ``(kind, [(field name, text or messages), ...])``."""
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        kind = "text" if isinstance(value[0], str) else "messages"
        items = []
        for index, item in enumerate(value):
            name = f"rejected[{index}]"
            if kind == "text" and not isinstance(item, str):
                raise DataError(
                    f"must be a string like rejected[0], got {kind_of(item)}", source=where, field=name
                )
            if kind == "messages" and not (isinstance(item, list) and item and isinstance(item[0], dict)):
                raise DataError(
                    f"must be a list of messages like rejected[0], got {kind_of(item)}",
                    source=where,
                    field=name,
                )
            items.append((name, item if kind == "text" else _messages(item, name, where)))
        return kind, items
    kind, single = _classify(value, "rejected", where)
    return kind, [("rejected", single)]


def _messages(value: list[Any], name: str, where: str) -> Messages:
    """Each message an object with string ``role`` and ``content``; other keys kept unless null."""
    messages = []
    for index, message in enumerate(value):
        here = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise DataError(
                f'must be a message {{"role", "content"}}, got {kind_of(message)}', source=where, field=here
            )
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise DataError(
                    f"missing: every message needs 'role' and 'content'; this one has {', '.join(map(str, message))}",
                    source=where,
                    field=f"{here}.{key}",
                )
            if not isinstance(message[key], str):
                raise DataError(
                    f"must be a string, got {kind_of(message[key])}", source=where, field=f"{here}.{key}"
                )
        if not message["role"].strip():
            raise DataError("is empty", source=where, field=f"{here}.role")
        messages.append({key: item for key, item in message.items() if item is not None})
    return messages


def _message_key(messages: Messages) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in messages]


class _ChatRenderer:
    """Renders conversations with the tokenizer's chat template and splits off the prompt text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer

    def check(self, where: str, name: str) -> None:
        if self.tokenizer is None:
            raise _SetupError(
                "is a list of messages (conversational data), which needs a tokenizer with a chat template, "
                "but none was given",
                source=where,
                field=name,
            )
        if not getattr(self.tokenizer, "chat_template", None):
            raise _SetupError(
                "is a list of messages (conversational data), but the tokenizer has no chat template; "
                "set tokenizer.chat_template or give the data as strings",
                source=where,
                field=name,
            )

    def split(
        self, prompt: Messages, responses: list[tuple[str, Messages]], where: str
    ) -> tuple[str, list[str]]:
        """Prompt text with the generation prompt; each response = render(prompt + response) minus it."""
        prompt_text = self._render(prompt, True, where, "prompt")
        texts = []
        for name, messages in responses:
            full = self._render(prompt + messages, False, where, name)
            if not full.startswith(prompt_text):
                raise DataError(
                    "the chat template is not prefix-consistent: the rendered prompt+response does not start "
                    "with the rendered prompt (add_generation_prompt=True), so the response cannot be cut out; "
                    "use a template whose generation prompt matches how it renders the assistant turn",
                    source=where,
                    field=name,
                )
            texts.append(full[len(prompt_text) :])
        return prompt_text, texts

    def _render(self, messages: Messages, generation_prompt: bool, where: str, name: str) -> str:
        assert self.tokenizer is not None
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:  # jinja raises its own types (e.g. "roles must alternate")
            raise DataError(
                f"the chat template failed on these messages: {type(error).__name__}: {error}",
                source=where,
                field=name,
            ) from None
        if not isinstance(text, str):
            raise _SetupError(
                f"the tokenizer's apply_chat_template returned {type(text).__name__}, not text",
                source=where,
                field=name,
            )
        return text
