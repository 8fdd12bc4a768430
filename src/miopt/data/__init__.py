"""Training data: reading and validating records (``records``, ``sources``) and tokenising them."""

from miopt.data.records import (
    GSM8K_COMPLETION_TEMPLATE,
    GSM8K_PROMPT_TEMPLATE,
    LoadReport,
    PreferenceRecord,
    SFTRecord,
    load_preference_records,
    load_sft_records,
    parse_preference_row,
    parse_sft_row,
)

__all__ = [
    "GSM8K_COMPLETION_TEMPLATE",
    "GSM8K_PROMPT_TEMPLATE",
    "LoadReport",
    "PreferenceRecord",
    "SFTRecord",
    "load_preference_records",
    "load_sft_records",
    "parse_preference_row",
    "parse_sft_row",
]
