"""``miopt compare``: several objectives from one start on one preference set, over seeds.

For each seed ``s`` and each objective, the SFT start is loaded fresh and trained by
:func:`miopt.training.preference.train_on_examples` with the same :class:`~miopt.training.preference.TrainOptions` except
``objective``, ``seed`` and ``output_dir`` (``DIR/runs/<objective>-seed<s>/``); the final model is
evaluated with the evaluation harness. Then the runs are aggregated into ``table.md`` /
``table.json`` (mean and sample standard deviation over seeds) and one PNG per quantity.

What a seed changes: only the preference stage's ``--seed``, i.e. the data order (which pairs form
each batch, and in which order; :class:`miopt.run.data_order.DataOrder`) and torch's RNG, which these models
do not use in training (no dropout). The SFT start, the pairs, the held-out set and greedy
evaluation are the same for every run, so two objectives with the same seed see exactly the same
batches in the same order.

Objective names: any registry name (:func:`miopt.objectives.available`), plus ``sft``, the
continued-SFT control (the registry's ``sft`` objective: per prompt the chosen response's mean
token NLL, :func:`miopt.objectives.sft.continued_sft`) on the same batches, with the same
steps, learning rate and schedule; the rejected responses get no gradient and are only measured,
so the control logs the same diagnostics (critic values with the same ``beta``) as the objectives.

Presets (small frozen dataclasses; tests inject smaller ones):

* :class:`ArithPreset` (``--preset arith``): the embedded default's task, start (the shipped
  ``builtin:arith``) and on-policy pairs (the start's own wrong greedy answers on the preference
  prompts, :func:`miopt.experiments.default_run.on_policy_pairs`), with
  :data:`miopt.experiments.default_run.DEFAULT_PREFERENCE_OPTIONS`; 3 seeds.
* :class:`Gsm8kPreset` (``--preset gsm8k``): pairs of ``miopt data gsm8k-pairs`` (real model
  samples, split by question), SFT start trained from scratch on GSM8K train with a locally
  trained BPE tokenizer (:mod:`miopt.experiments.gsm8k_model`); held-out accuracy on the held-out questions.
"""

from miopt.experiments.compare.options import (
    DEFAULT_OBJECTIVES,
    PRESETS,
    CompareOptions,
    check_compare_options,
    preset_from_options,
)
from miopt.experiments.compare.plots import PLOTS, plot_quantity
from miopt.experiments.compare.presets import ArithPreset, Gsm8kPreset, Prepared
from miopt.experiments.compare.runs import curve_summary, pair_metrics, run_compare, run_key, run_one
from miopt.experiments.compare.smollm2 import PlateauSFT, SmolLM2ArithPreset
from miopt.experiments.compare.table import (
    COLUMNS,
    RESULT_FILE,
    RUNS_DIR,
    SAMPLING_COLUMNS,
    SFT_CONTROL,
    TABLE_JSON,
    TABLE_MD,
    aggregate,
    columns_for,
    format_table,
    mean_std,
    summary_table,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_OBJECTIVES",
    "PLOTS",
    "PRESETS",
    "RESULT_FILE",
    "RUNS_DIR",
    "SFT_CONTROL",
    "TABLE_JSON",
    "TABLE_MD",
    "ArithPreset",
    "CompareOptions",
    "Gsm8kPreset",
    "PlateauSFT",
    "Prepared",
    "SmolLM2ArithPreset",
    "aggregate",
    "check_compare_options",
    "curve_summary",
    "SAMPLING_COLUMNS",
    "columns_for",
    "format_table",
    "summary_table",
    "mean_std",
    "pair_metrics",
    "plot_quantity",
    "preset_from_options",
    "run_compare",
    "run_key",
    "run_one",
]
