"""Preference training: data and model in, an aligned Hugging Face checkpoint and its curves out.

``train(options)`` loads and validates everything first (so bad input fails before anything is
written), computes or reads the cached reference log-probs, then hands a step function to the
shared loop (:mod:`miopt.run.loop`). The step function (:mod:`miopt.training.preference_step`) is the only place
where log-probs meet an objective; the maths lives in :mod:`miopt.objectives` and :mod:`miopt.logprobs.forward`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from miopt import objectives
from miopt.config import option
from miopt.data import load_preference_records
from miopt.data.tokenize import TokenizedExample, fingerprint, tokenize_preferences
from miopt.errors import OptionError
from miopt.logprobs.forward import DEFAULT_CHUNK_TOKENS
from miopt.logprobs.packing import PACKINGS
from miopt.logprobs.reference import (
    ENTRY_FORMAT,
    ReferenceLogps,
    cache_key,
    compute_reference_logps,
    default_cache_dir,
    load_or_compute,
)
from miopt.model import loading as models
from miopt.model.attention import block_attention
from miopt.model.modeling import disable_dropout, unwrap
from miopt.run.atomic_io import atomic_directory, atomic_write_json, move_files_into, writing
from miopt.run.checkpoint import kept_note
from miopt.run.engine import full_state_dict, make_accelerator, sharded_setup
from miopt.run.loop import LoopOptions, run_loop
from miopt.run.plots import plot_training_curves
from miopt.run.preemption import stop_after
from miopt.run.ranks import is_main_process
from miopt.run.run_folder import RunFolder
from miopt.training.objective_flags import (
    given_objective_options,
    ld_alpha_of,
)
from miopt.training.option_checks import check_train_options
from miopt.training.preference_step import PreferenceData, make_step_function
from miopt.training.unpaired import as_unpaired, make_unpaired_step_function, unpaired_loaders


@dataclass
class ModelOptions:
    """Which model, and how to adapt it."""

    model: str | None = option(
        None,
        "Policy: any Hugging Face causal-LM folder or hub id; 'builtin' = the tiny embedded model "
        "(fresh), 'builtin:arith' = it trained on the built-in arithmetic task (shipped); a GGUF file "
        "(PATH/FILE.gguf, or owner/repo/FILE.gguf on the hub; needs the gguf extra) is converted once to a "
        "safetensors folder. With neither --model nor --data, the embedded default run.",
    )
    dtype: str | None = option(
        None, "Load weights in this dtype (float32, bfloat16, float16); default: as saved."
    )
    max_length: int = option(1024, "Max tokens of prompt + response; longer responses are cut at the end.")
    max_prompt_length: int | None = option(None, "Prompts longer than this keep their last tokens.")
    skip_invalid: bool = option(False, "Skip bad records (and say how many) instead of stopping.")
    lora_r: int = option(0, "LoRA rank (peft); 0 trains all weights. Hu et al. 2021, arXiv 2106.09685.")
    lora_alpha: float = option(16.0, "LoRA scaling alpha.")
    lora_dropout: float = option(0.0, "LoRA dropout.")
    lora_target_modules: list[str] | None = option(
        None, "Module names to adapt (default: peft's for the model)."
    )
    merge_lora: bool = option(False, "Save the LoRA-merged full model instead of the adapter.")


@dataclass
class TrainOptions(ModelOptions, LoopOptions):
    """Options of ``miopt train``."""

    data: str | None = option(
        None, "Preference data: JSONL/JSON/Parquet/CSV file, save_to_disk folder, or hub id."
    )
    objective: str = option(
        "mio",
        "Objective: a registry name (miopt.objectives.available(): mio, dpo, ipo, kto, dpop, cal_dpo, "
        "apo_zero, ... and TRL's loss_type names) or a weighted sum NAME:WEIGHT,NAME:WEIGHT, e.g. "
        "'mio:1.0,sft:0.5' (TRL's loss_type list with loss_weights); each term is logged as loss/<name>. "
        "'rpo' = 'dpo:1.0,sft:1.0'. 'kto' trains on unpaired data (prompt, completion, label; paired rows "
        "are split).",
    )
    beta: float = option(
        0.1, "Critic scale: T = beta * (log pi - log pi_ref) (DPO's beta, Rafailov et al. 2023)."
    )
    negatives: str | None = option(
        None,
        "Negative distribution of dv/js/nwj: 'marginal' (chosen and rejected, the "
        "paper's) or 'rejected' (rejected only); None = the objective's own default.",
    )
    label_smoothing: float | None = option(None, "Label-noise rate of 'robust' (Chowdhury et al. 2024).")
    simpo_gamma: float | None = option(None, "Target margin gamma of 'simpo' (Meng et al. 2024).")
    sft_weight: float = option(0.0, "Add weight x chosen NLL per token to the loss (RPO, Pang et al. 2024).")
    use_weighting: bool | None = option(
        None,
        "WPO: each pair's loss weighted by how likely its responses are under the policy (Zhou et al. "
        "2024, 'WPO: Enhancing RLHF with Weighted Preference Optimization'); TRL's use_weighting.",
    )
    ld_alpha: float | None = option(
        None,
        "LD-DPO: weight in [0, 1] of the tokens beyond the shorter response of a pair (Liu et al. 2024, "
        "'Length Desensitization in Directed Preference Optimization'); TRL's ld_alpha.",
    )
    f_divergence_type: str | None = option(
        None,
        "Divergence behind the reward (Wang et al. 2023, 'Beyond Reverse KL'): reverse_kl (DPO), "
        "forward_kl, js_divergence, alpha_divergence; TRL's f_divergence_type.",
    )
    f_alpha_divergence_coef: float | None = option(
        None, "alpha of f_divergence_type=alpha_divergence (default 0.5); TRL's f_alpha_divergence_coef."
    )
    discopop_tau: float | None = option(
        None,
        "Temperature of 'discopop' (Chris Lu et al. 2024, DiscoPOP), > 0, default 0.05; TRL's discopop_tau.",
    )
    objective_option: list[str] | None = option(
        None,
        "Objective options as KEY=VALUE (repeatable), checked against the objective's declared options "
        "before anything loads, e.g. dpop_lambda=50, discopop_tau=0.05, label_smoothing=0.001 (exo_pair), "
        "f_divergence_type=js_divergence, use_weighting=true (WPO, Zhou et al. 2024), ld_alpha=0.5 (LD-DPO, "
        "Liu et al. 2024), desirable_weight=1.0 (kto). See README, Objectives.",
    )
    load_in_4bit: bool = option(
        False, "Load the frozen LoRA base in 4-bit NF4 (QLoRA); needs bitsandbytes and a CUDA GPU."
    )
    ref_model: str | None = option(
        None, "Reference model; default: the starting policy (or, with LoRA, the base)."
    )
    reference: str = option(
        "precompute",
        "'precompute': reference log-probs once, cached on disk; 'on-the-fly': a "
        "reference forward each step.",
        choices=["precompute", "on-the-fly"],
    )
    cache_dir: str | None = option(
        None, "Cache of reference log-probs (default $MIOPT_CACHE or ~/.cache/miopt)."
    )
    logprob_chunk: int = option(
        DEFAULT_CHUNK_TOKENS, "Response tokens per log-softmax chunk; 0 = full logits."
    )
    packing: str = option(
        "shared-prompt",
        "Batch layout: 'shared-prompt' (prompt computed once for all responses, no padding), "
        "'packed' (no padding), 'padded' (plain; the reference). See miopt.logprobs.packing.",
        choices=list(PACKINGS),
    )
    disable_dropout: bool = option(
        True,
        "Set every dropout of the policy and reference model to 0 (TRL's disable_dropout); "
        "'--disable-dropout false' keeps the model's own (the log-probs are then noisy, and the policy's "
        "differ from the reference's before any update). --lora-dropout is applied either way.",
    )
    chosen_decline_warning: float = option(
        5.0, "Warn when the mean chosen log-prob falls this many nats below the reference (0 disables)."
    )


class ChosenDeclineMonitor:
    """Warns once when the chosen log-prob has fallen ``margin`` nats below the reference:
    the late-training decline of DPO that MIO exists to prevent (theory.md section 2)."""

    def __init__(self, margin: float, stream=None, objective: str = "") -> None:
        self.margin, self.stream, self.warned_at = margin, stream, None
        self.objective = objective

    def __call__(self, record: dict[str, float]) -> None:
        change = record.get("logps/chosen_change")
        if self.margin <= 0 or change is None or self.warned_at is not None:
            return
        if change < -self.margin:
            self.warned_at = int(record["step"])
            remedies = "a smaller learning rate or --sft-weight"
            if self.objective not in ("mio", "js"):
                remedies = f"--objective mio, {remedies}"
            print(
                f"\nWARNING: step {self.warned_at}: chosen log-prob is {change:.2f} nats below the reference "
                f"(threshold {self.margin}). The preferred responses are losing likelihood; this is the decline "
                f"MIO (--objective mio) is designed to prevent. Consider {remedies}.",
                file=self.stream or sys.stderr,
                flush=True,
            )


def apply_lora(model, options: ModelOptions):
    """Wrap ``model`` with LoRA adapters (peft); the frozen base serves as the reference."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=options.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    # The adapters' random initialisation follows --seed (the same on every process and every run).
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(getattr(options, "seed", 0))
        return get_peft_model(model, config)


def save_model(
    model, tokenizer, output_dir: str | Path, *, merge_lora: bool = False, state_dict=None
) -> None:
    """``save_pretrained`` of model and tokenizer into ``output_dir``, each file replaced atomically;
    a failed write (a full disk) removes the partial files and raises WriteError.

    ``state_dict``: the full weights gathered from a sharded model (FSDP, ZeRO-3)."""
    model = unwrap(model)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    output_dir = Path(output_dir)
    kept = f"the final model was not written; {kept_note(output_dir)}"
    with writing(output_dir, kept=kept):
        temporary = atomic_directory(output_dir / "final-model")
    with writing(output_dir, kept=kept, remove=temporary):
        if state_dict is not None:
            model.save_pretrained(temporary, state_dict=state_dict)
        else:
            model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        move_files_into(temporary, output_dir)


def reference_logps(
    options: TrainOptions, policy, examples, pad_token_id: int, accelerator
) -> tuple[ReferenceLogps, bool]:
    """Cached reference log-probs; the reference model is loaded only on a cache miss."""
    source = options.ref_model or options.model
    parts = [
        models.model_fingerprint(source, seed=options.seed),
        fingerprint(examples),
        options.dtype,
        options.bf16,
        f"entry-format-{ENTRY_FORMAT}",
    ]
    if options.load_in_4bit and not options.ref_model:
        parts.append("nf4")
    path = Path(options.cache_dir or default_cache_dir()) / "reference" / f"{cache_key(*parts)}.safetensors"

    def compute() -> ReferenceLogps:
        model = models.load_model(options.ref_model, dtype=options.dtype) if options.ref_model else policy
        if options.disable_dropout:
            disable_dropout(model)
        if not getattr(model, "is_loaded_in_4bit", False):  # a quantised model is placed at load
            model.to(accelerator.device)
        return compute_reference_logps(
            model,
            examples,
            pad_token_id,
            batch_size=max(options.batch_size, 8),
            chunk_tokens=options.logprob_chunk,
            progress=options.progress and accelerator.is_main_process,
            accelerator=accelerator,
            packing=options.packing,
        )

    shape = (len(examples), max(len(example.rejected_ids) for example in examples))
    return load_or_compute(path, compute, accelerator, shape=shape)


def load_examples(options: ModelOptions, load_records, tokenize, *, report: bool = True):
    """Tokenizer of ``options.model`` and the validated, tokenised records of ``options.data``:
    ``load_records`` reads and checks them, ``tokenize`` applies the truncation rule. Returns
    (tokenizer, examples, load report, tokenise report); an empty result is an error."""
    tokenizer = models.load_tokenizer(options.model)
    records, load_report = load_records(options.data, tokenizer, skip_invalid=options.skip_invalid)
    examples, token_report = tokenize(
        records,
        tokenizer,
        max_length=options.max_length,
        max_prompt_length=options.max_prompt_length,
        skip_invalid=options.skip_invalid,
    )
    if not examples:
        raise OptionError(f"{options.data}: no usable records left")
    if report:
        print(
            f"data: {load_report.kept} records from {options.data} ({load_report.skipped} skipped); "
            f"{token_report.describe()}",
            file=sys.stderr,
        )
    return tokenizer, examples, load_report, token_report


def train(options: TrainOptions) -> dict[str, Any]:
    """Run ``miopt train`` on files: validate everything, then train and save. Returns the summary."""
    check_train_options(options)
    if not options.model:
        raise OptionError("--model is required with --data (a model folder, hub id, or 'builtin')")
    if not options.data:
        raise OptionError("--data is required with --model")
    main = is_main_process()
    with RunFolder(options, main_process=main) as folder:
        folder.check()
        paired = (load_preference_records, tokenize_preferences)
        load_records, tokenize = unpaired_loaders() if objectives.is_unpaired(options.objective) else paired
        tokenizer, examples, load_report, token_report = load_examples(
            options, load_records, tokenize, report=main
        )
        model = models.load_model(
            options.model,
            tokenizer,
            dtype=options.dtype,
            seed=options.seed,
            load_in_4bit=options.load_in_4bit,
        )
        # Created after the model is loaded: with DeepSpeed ZeRO-3 an earlier Accelerator would make
        # from_pretrained partition the weights, and the reference pass needs them whole.
        accelerator = make_accelerator(options.bf16)
        folder.start()
        return train_on_examples(
            options,
            model,
            tokenizer,
            examples,
            accelerator=accelerator,
            extra_summary={
                "data": options.data,
                "skipped_records": load_report.skipped,
                "truncated_records": token_report.truncated,
            },
        )


def train_on_examples(
    options: TrainOptions,
    model,
    tokenizer,
    examples: list[TokenizedExample],
    *,
    accelerator=None,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train an already-loaded model on tokenised examples and save everything into ``output_dir``."""
    check_train_options(options)
    accelerator = accelerator or make_accelerator(options.bf16)
    chunk_tokens = sharded_setup(
        accelerator, logprob_chunk=options.logprob_chunk, merge_lora=options.merge_lora
    )
    objective = objectives.build(
        options.objective, given_objective_options(options), sft_weight=options.sft_weight
    )
    examples = as_unpaired(examples, options) if objective.unpaired else examples
    started = time.perf_counter()
    if options.disable_dropout:  # before LoRA: an explicit --lora-dropout stays
        disable_dropout(model)
    model, references = _references(options, model, objective, examples, tokenizer, accelerator)
    step = _step_function(options, objective, examples, references, tokenizer.pad_token_id, chunk_tokens)
    monitor = ChosenDeclineMonitor(options.chosen_decline_warning, objective=options.objective)
    stateful = {"objective": objective.state} if objective.state is not None else {}
    # a signal during the final save waits for it (the steps are done), then stops the run
    with stop_after(accelerator, options.output_dir):
        with block_attention(model), block_attention(references.model):
            result = run_loop(
                options,
                model=model,
                num_examples=len(examples),
                step_fn=step,
                stateful=stateful,
                on_log=monitor if accelerator.is_main_process else None,
                accelerator=accelerator,
            )
        state_dict = full_state_dict(accelerator, model)
        summary: dict[str, Any] = {}
        if accelerator.is_main_process:
            save_model(
                model, tokenizer, options.output_dir, merge_lora=options.merge_lora, state_dict=state_dict
            )
            summary = _write_summary(
                options,
                result,
                {
                    "examples": len(examples),
                    "reference_cached": references.cached,
                    "seconds": round(time.perf_counter() - started, 2),
                    "chosen_decline_warning_step": monitor.warned_at,
                    **(extra_summary or {}),
                },
            )
        accelerator.wait_for_everyone()
    return summary


@dataclass
class _References:
    """Where the step gets reference log-probs: a cache computed before training, a frozen copy of
    the model run beside it, the adapter-disabled model (LoRA), or nowhere (reference-free)."""

    cache: Any = None
    cached: bool = False
    model: Any = None


def _references(options: TrainOptions, model, objective, examples, tokenizer, accelerator):
    """The reference of ``options.reference`` (precomputed before LoRA wraps the model); returns the
    model to train (LoRA-wrapped with ``--lora-r``) and the references."""
    references = _References()
    needs_reference = not objective.reference_free
    if needs_reference and options.reference == "precompute":
        references.cache, references.cached = reference_logps(
            options, model, examples, tokenizer.pad_token_id, accelerator
        )
        if accelerator.is_main_process:
            print(
                f"reference log-probs: {'read from cache' if references.cached else 'computed and cached'}",
                file=sys.stderr,
            )
    if options.lora_r:
        return apply_lora(model, options), references
    if needs_reference and options.reference == "on-the-fly":
        if options.ref_model:
            reference_model = models.load_model(options.ref_model, dtype=options.dtype)
        else:
            reference_model = copy.deepcopy(model)
        reference_model.requires_grad_(False).eval().to(accelerator.device)
        if options.disable_dropout:
            disable_dropout(reference_model)
        references.model = reference_model
    return model, references


def _step_function(
    options: TrainOptions, objective, examples, references: _References, pad_token_id, chunk_tokens
):
    """The paired (or, for KTO, unpaired) step function of ``objective`` on ``examples``."""
    make_step = (
        make_unpaired_step_function
        if objective.unpaired
        else partial(make_step_function, ld_alpha=ld_alpha_of(options))
    )
    return make_step(
        objective,
        PreferenceData(examples, references.cache),
        beta=options.beta,
        pad_token_id=pad_token_id,
        chunk_tokens=chunk_tokens,
        reference_model=references.model,
        packing=options.packing,
    )


def _write_summary(options: TrainOptions, result, details: dict[str, Any]) -> dict[str, Any]:
    """``curves.png`` and ``summary.json`` of a finished run (main process)."""
    output_dir = Path(options.output_dir)
    plot_training_curves(
        result.history, output_dir / "curves.png", title=f"{options.objective}, beta={options.beta}"
    )
    summary = {
        "objective": options.objective,
        "beta": options.beta,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "examples": details.pop("examples"),
        "reference_cached": details.pop("reference_cached"),
        "seconds": details.pop("seconds"),
        "first": result.history[0] if result.history else {},
        "final": result.history[-1] if result.history else {},
        "chosen_decline_warning_step": details.pop("chosen_decline_warning_step"),
        "options": dataclasses.asdict(options),
        **details,
    }
    atomic_write_json(output_dir / "summary.json", summary)
    return summary
