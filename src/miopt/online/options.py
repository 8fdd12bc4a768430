"""Options of ``miopt online`` and their validation (before anything is loaded or written)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from miopt.config import Preset, option
from miopt.errors import OptionError
from miopt.training.option_checks import check_train_options
from miopt.training.preference import TrainOptions

ARITHMETIC = "arithmetic"
NO_VERIFIER = "none"

# Options a resumed run must share with the run it continues (others, e.g. --rounds, may change).
RESUME_FIXED = (
    "model",
    "data",
    "samples",
    "prompts_per_round",
    "temperature",
    "top_p",
    "max_new_tokens",
    "verifier",
    "reward_threshold",
    "reward_model",
    "score_margin",
    "inject_reference",
    "reference_mode",
    "objective",
    "beta",
    "seed",
)

# Preference-stage settings on the built-in task with the built-in SFT start (as in default_run);
# any option given on the command line or in --config wins.
BUILTIN_DEFAULTS = Preset(
    TrainOptions,
    objective="mio",
    beta=0.5,
    learning_rate=5e-5,
    batch_size=16,
    lr_scheduler="constant",
    warmup_ratio=0.0,
    max_length=128,
    logging_steps=5,
)


@dataclass
class OnlineOptions(TrainOptions):
    """Options of ``miopt online`` (the preference-training options apply to each round's update)."""

    model: str | None = option(
        None,
        "Starting policy: a Hugging Face causal-LM folder or hub id, a .gguf file, or 'builtin' (untrained). "
        "With --data arithmetic and no --model: the shipped start builtin:arith (as miopt train's default).",
    )
    data: str | None = option(
        ARITHMETIC,
        "Prompts with gold answers: 'arithmetic' (the built-in task's training problems) or a JSONL "
        "file in a miopt eval format (GSM8K question/answer, MATH problem/solution, prompt+answer).",
    )
    output_dir: str = option(
        "runs/online", "Folder for rounds.jsonl, round-NNN/ checkpoints and summary.json."
    )
    resume: bool = option(False, "Continue the run in --output-dir from its last complete round.")
    rounds: int = option(3, "Rounds of sample -> verify -> pair -> update.")
    samples: int = option(8, "K: responses sampled per prompt and round.")
    prompts_per_round: int = option(128, "Prompts sampled per round (taken in turn from a seeded shuffle).")
    temperature: float = option(1.0, "Sampling temperature (> 0 when --samples > 1).")
    top_p: float = option(1.0, "Nucleus sampling threshold (Holtzman et al. 2020).")
    max_new_tokens: int | None = option(
        None, "Most tokens per sampled response (default: 64 on arithmetic, 256 otherwise)."
    )
    generation_batch_size: int = option(64, "Prompts per generation batch (each holds K rows).")
    verifier: str = option(
        "builtin",
        "Reward: 'builtin' (the answer checking of miopt eval, by each record's answer type), an answer "
        "type (number, math, arithmetic, exact), or module:function called as f(prompt, completion, "
        "answer) -> bool | float. With --reward-model it is a gate (only correct samples can be chosen); "
        "'none' there ranks by the reward model alone.",
    )
    reward_threshold: float = option(0.5, "A sample is correct (a positive) when its reward is >= this.")
    reward_model: str | None = option(
        None,
        "A reward-model folder (miopt reward's output, or any one-score sequence classifier): scores every "
        "sample; the best-scored sample is chosen, the others scored below it by more than --score-margin "
        "are rejected (docs/rlhf.md).",
    )
    score_margin: float = option(
        0.0, "With --reward-model: a sample is rejected when its score is below the chosen one's minus this."
    )
    reward_batch_size: int = option(64, "With --reward-model: samples per scoring forward pass.")
    inject_reference: bool = option(
        False,
        "When no sample of a prompt is correct, use its reference solution as the positive "
        "(docs/theory.md section 2).",
    )
    reference_mode: str = option(
        "previous",
        "Reference of each round's update: 'start' (the starting policy) or 'previous' (the policy at "
        "the start of the round, as in iterative DPO).",
        choices=["start", "previous"],
    )
    eval_data: str | None = option(
        None,
        "Held-out records for greedy pass@1 before the first and after the last round (default on "
        "arithmetic: the task's held-out split; on files: none).",
    )
    eval_limit: int = option(500, "Held-out records evaluated (0: no held-out evaluation).")
    eval_every: int = option(0, "Also evaluate after every N-th round (0: only before and after).")
    keep_rounds: int = option(0, "Round checkpoints kept (oldest removed first; 0 keeps all).")


def check_online_options(options: OnlineOptions) -> None:
    """Fail fast on values no run can use (before anything is loaded or written)."""
    check_train_options(options)
    if not options.data:
        raise OptionError("give --data: 'arithmetic' or a JSONL file of prompts with answers")
    if options.rounds < 1:
        raise OptionError(f"--rounds must be >= 1, got {options.rounds}")
    if options.samples < 1:
        raise OptionError(f"--samples must be >= 1, got {options.samples}")
    if options.samples > 1 and options.temperature <= 0:
        raise OptionError("--samples > 1 needs sampling: give --temperature above 0 (e.g. 1.0)")
    if not 0 < options.top_p <= 1:
        raise OptionError(f"--top-p must be in (0, 1], got {options.top_p}")
    if options.prompts_per_round < 1:
        raise OptionError(f"--prompts-per-round must be >= 1, got {options.prompts_per_round}")
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        raise OptionError("--max-new-tokens must be >= 1")
    if options.generation_batch_size < 1 or options.reward_batch_size < 1:
        raise OptionError("--generation-batch-size and --reward-batch-size must be >= 1")
    if options.eval_limit < 0 or options.eval_every < 0 or options.keep_rounds < 0:
        raise OptionError("--eval-limit, --eval-every and --keep-rounds must be >= 0")
    if options.score_margin < 0:
        raise OptionError(f"--score-margin must be >= 0, got {options.score_margin}")
    if options.reward_model is not None:
        check_reward_model_folder(options.reward_model)
    if options.verifier == NO_VERIFIER and options.reward_model is None:
        raise OptionError("--verifier none needs --reward-model (something must score the samples)")
    if options.ref_model:
        raise OptionError(
            "--ref-model does not apply to online training; choose --reference-mode start|previous"
        )
    if options.lora_r and not options.merge_lora:
        raise OptionError(
            "--lora-r in online training needs --merge-lora (each round starts from a full model)"
        )
    if options.lora_r and options.reference_mode == "start" and options.reference == "on-the-fly":
        raise OptionError(
            "--reference-mode start with LoRA needs --reference precompute (on the fly, LoRA's "
            "reference is the round's base, i.e. the previous policy)"
        )


def check_reward_model_folder(path: str) -> None:
    """``path`` holds a one-score sequence classifier (its config.json says so)."""
    config_file = Path(path, "config.json")
    if not config_file.is_file():
        raise OptionError(
            f"--reward-model {path!r}: not a model folder (no config.json); train one with miopt reward"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise OptionError(f"--reward-model {path!r}: cannot read config.json: {error}") from error
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {"0": None})
    if not any(name.endswith("ForSequenceClassification") for name in architectures) or labels != 1:
        raise OptionError(
            f"--reward-model {path!r}: not a one-score sequence classifier (architectures {architectures}, "
            f"{labels} labels); train one with miopt reward"
        )
