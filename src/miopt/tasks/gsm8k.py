"""GSM8K's prompt format, shared by SFT data, preference pairs and evaluation (one place)."""

from __future__ import annotations

GSM8K_PROMPT = "Question: {question}\nAnswer:\n"
"""The prompt for a GSM8K question; the worked solution follows on the next line."""


def gsm8k_prompt(question: str) -> str:
    return GSM8K_PROMPT.format(question=question.strip())
