"""Training data: reading and validating records (``records``, ``sources``) and tokenising them."""

from miopt.data.records import (
    LoadReport,
    PreferenceRecord,
    SFTRecord,
    load_preference_records,
    load_sft_records,
    parse_preference_row,
    parse_sft_row,
)

__all__ = [
    "LoadReport",
    "PreferenceRecord",
    "SFTRecord",
    "load_preference_records",
    "load_sft_records",
    "parse_preference_row",
    "parse_sft_row",
]
