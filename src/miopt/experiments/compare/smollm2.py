"""``miopt compare --preset smollm2-arith``: a real pretrained model through the field's pipeline.

1. **The start.** SmolLM2-135M-Instruct (the GGUF file of ``miopt fetch smollm2``, or ``--model``: a
   folder, a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``, another ``.gguf``) is fine-tuned
   on worked solutions of the built-in arithmetic task (:data:`SMOLLM2_DIFFICULTY`: operands 1-99;
   with 3-digit operands the start stalled at 16.5% validation accuracy, docs/experiments.md) in segments of ``sft.segment_steps`` at a constant learning rate. After
   each segment its greedy accuracy on the validation split is measured; SFT stops at the plateau
   (a segment that gains less than ``sft.min_gain``) or after ``sft.max_segments``. The curve is kept
   in ``sft-start/plateau.json``; with a constant rate and no warmup each segment continues the
   previous one exactly (a resumed run equals an uninterrupted one).
2. **On-policy pairs** from that start's own samples, as in Lv et al. (2025) and the online setting:
   ``samples`` completions per preference prompt at temperature 1, checked by the task's answer
   checker; per prompt the first correct sample is chosen and every wrong one rejected
   (:func:`miopt.online.pairs.build_pairs`); prompts where all samples agree give no contrast and are
   left out. The last ``heldout_pair_prompts`` prompts' pairs are held out of training and measure the
   log-prob changes on unseen pairs.
3. Every arm trains from the same start on the same pairs with the same budget (steps, batch, learning
   rate, schedule); each run's final model is evaluated greedily on the held-out problems and, for
   pass@1 / pass@k, with ``pass_samples`` samples at temperature 1 on the first ``pass_problems`` of
   them: does preference training add solutions the start could not sample, or only sharpen?
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from miopt.data.tokenize import TokenizedExample, tokenize_examples
from miopt.errors import OptionError
from miopt.evaluation import evaluate
from miopt.evaluation.generation import generate
from miopt.evaluation.tasks import arithmetic_records
from miopt.experiments.compare.presets import Prepared, _apply
from miopt.model.fetch import fetch
from miopt.model.loading import load_model, load_tokenizer, model_fingerprint
from miopt.online.pairs import build_pairs
from miopt.run.atomic_io import atomic_write_json
from miopt.run.checkpoint import list_checkpoints
from miopt.tasks import arithmetic
from miopt.tasks.default import DefaultTask, start_problems, task_splits
from miopt.training.sft import SFTOptions, sft_on_examples

# Operands 1-99, 3 or 4 of them (the built-in task). Measured: with 1-999 the fine-tuned start reached
# 8.5%, 15.5%, 16.5% validation accuracy after 40, 80, 120 steps, far below a measurable 45-85%.
SMOLLM2_DIFFICULTY = arithmetic.Difficulty(max_operand=99, operand_counts=(3, 4))
SMOLLM2_TASK = DefaultTask(
    pool_problems=2000,
    validation_problems=200,
    preference_prompts=1000,
    heldout_problems=400,
    max_length=128,
    max_new_tokens=64,
    difficulty=SMOLLM2_DIFFICULTY,
)
START_DIR = "sft-start"
PLATEAU_FILE = "plateau.json"
PAIRS_FILE = "pairs.json"  # the sampled pairs (prompt, chosen, rejected), reused by a later invocation


@dataclass(frozen=True)
class PlateauSFT:
    """How the start is fine-tuned: segments at a constant rate until validation accuracy stops rising."""

    segment_steps: int = 40
    max_segments: int = 5
    min_segments: int = 3  # 200 validation problems: one segment's gain is within ~3 points of noise
    min_gain: float = 0.02  # a segment that adds less validation accuracy than this ends SFT
    batch_size: int = 16
    learning_rate: float = 1e-4
    train_problems: int = 6400  # fresh problems, none in the task's pool or held-out set
    seed: int = 0


@dataclass(frozen=True)
class SmolLM2ArithPreset:
    """``--preset smollm2-arith``: SmolLM2-135M-Instruct, SFT to its plateau, then its own samples."""

    name: ClassVar[str] = "smollm2-arith"
    objectives: ClassVar[tuple[str, ...]] = ("mio", "dpo", "dpop", "cal_dpo", "sft")
    start_model: str | None = None  # None: the file of `miopt fetch smollm2` (fetched when missing)
    task: DefaultTask = SMOLLM2_TASK
    sft: PlateauSFT = PlateauSFT()
    preference_prompts: int = 512  # prompts sampled for pairs (from the task's preference split)
    heldout_pair_prompts: int = 64  # the last of them: pairs held out of training
    samples: int = 4  # K samples per prompt at temperature 1
    pass_problems: int = 100
    pass_samples: int = 4
    eval_limit: int | None = 300  # held-out problems scored greedily
    generation_batch_size: int = 64
    seeds: int = 3
    overrides: tuple[tuple[str, Any], ...] = ()
    # Candidates chosen among per objective on the validation split (miopt.experiments.compare.selection). Measured
    # with the one shared lr 1e-5 (seed 0): the log-prob changes after 40 steps were small (chosen
    # -0.7..+0.3 nats) and the arms within noise of each other; 3e-5 tests a stronger update.
    settings_grid: tuple[tuple[tuple[str, Any], ...], ...] = (
        (("learning_rate", 1e-5),),
        (("learning_rate", 3e-5),),
    )
    base: dict[str, Any] = field(
        default_factory=lambda: {
            "beta": 0.1,
            "learning_rate": 1e-5,
            "batch_size": 8,
            "max_steps": 40,
            "warmup_ratio": 0.1,
            "lr_scheduler": "constant",
            "logging_steps": 5,
            "max_length": 128,
            "save_steps": 20,
            "save_total_limit": 1,
        },
        compare=False,
    )

    def preference_options(self) -> dict[str, Any]:
        return _apply(self.base, self.overrides)

    def model_source(self) -> str:
        if self.start_model:
            return self.start_model

        return str(fetch("smollm2"))

    def prepare(self, output_dir: Path, progress: bool) -> Prepared:

        source = self.model_source()
        splits = task_splits(self.task)
        start_dir = plateau_sft(self, source, splits.validation, output_dir / START_DIR, progress)
        tokenizer = load_tokenizer(str(start_dir))
        model = load_model(str(start_dir))
        prompts = splits.preference[: self.preference_prompts]
        examples, stats = sampled_pairs(
            self, model, tokenizer, prompts, progress=progress, cache=output_dir / PAIRS_FILE
        )
        # examples follow the prompts' order; those of the last prompts are held out of training
        trained_prompts = len(prompts) - self.heldout_pair_prompts
        cut = sum(1 for example in examples if _prompt_index(example) < trained_prompts)
        heldout = splits.heldout[: self.eval_limit] if self.eval_limit else splits.heldout
        del model

        def evaluate_model(policy) -> float:
            return greedy_accuracy(self, policy, tokenizer, heldout)

        def validate_model(policy) -> float:
            return greedy_accuracy(self, policy, tokenizer, splits.validation)

        def sample_model(policy) -> dict[str, float]:
            return pass_at_k(self, policy, tokenizer, heldout[: self.pass_problems])

        return Prepared(
            sft_dir=start_dir,
            tokenizer=tokenizer,
            examples=examples[:cut],
            heldout_pairs=examples[cut:],
            evaluate=evaluate_model,
            preference=self.preference_options(),
            sample=sample_model,
            validate=validate_model,
            info={
                "task": (
                    "built-in arithmetic, operands 1-"
                    f"{self.task.difficulty.max_operand}, {'/'.join(map(str, self.task.difficulty.operand_counts))}"
                    f" operands; start: {source} fine-tuned to its validation plateau ({start_dir})"
                ),
                "pairs": (
                    f"the start's own samples ({self.samples} per prompt, temperature 1): first correct "
                    "sample chosen, every wrong one rejected"
                ),
                "train_pairs": cut,
                "heldout_pairs": len(examples) - cut,
                "heldout_problems": len(heldout),
                "pair_counts": stats,
                "plateau": json.loads((start_dir / PLATEAU_FILE).read_text()),
                "pass_at_k": {
                    "problems": min(self.pass_problems, len(heldout)),
                    "samples": self.pass_samples,
                },
                "task_splits": dataclasses.asdict(self.task),
            },
        )


def _prompt_index(example: TokenizedExample) -> int:
    return int(example.source.rsplit(":", 1)[1])


def greedy_accuracy(preset: SmolLM2ArithPreset, model, tokenizer, problems) -> float:
    summary, _ = evaluate(
        model,
        tokenizer,
        arithmetic_records(problems),
        max_new_tokens=preset.task.max_new_tokens,
        batch_size=preset.generation_batch_size,
    )
    return summary["accuracy"]


def pass_at_k(preset: SmolLM2ArithPreset, model, tokenizer, problems) -> dict[str, float]:
    """pass@1 and pass@k (Chen et al. 2021, eq. 1) from ``pass_samples`` samples at temperature 1."""
    k = preset.pass_samples
    summary, _ = evaluate(
        model,
        tokenizer,
        arithmetic_records(problems),
        max_new_tokens=preset.task.max_new_tokens,
        batch_size=max(1, preset.generation_batch_size // k),
        num_samples=k,
        temperature=1.0,
        pass_k=[1, k],
    )
    generation = summary.get("generation", summary)
    return {"pass_at_1": generation["pass@1"], "pass_at_k": generation[f"pass@{k}"], "pass_k": k}


def sampled_pairs(
    preset: SmolLM2ArithPreset, model, tokenizer, problems, *, progress: bool, cache: Path
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """The start's own samples on ``problems`` -> tokenised examples (chosen, rejected...). The pairs
    are kept in ``cache`` (JSON) and read back by a later call on the same start and prompts."""

    key = [model_fingerprint(str(cache.parent / START_DIR)), [p.expression for p in problems]]
    key += [preset.samples, preset.task.max_new_tokens, preset.sft.seed]
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("key") == key:
        pairs, counts = saved["pairs"], saved["counts"]
        print(f"[compare] pairs from the start's samples: reused {cache} ({counts})", file=sys.stderr)
    else:
        pairs, counts = _sample_pairs(preset, model, tokenizer, problems, progress)
        atomic_write_json(cache, {"key": key, "counts": counts, "pairs": pairs})
    examples, _ = tokenize_examples(
        [pair["prompt"] for pair in pairs],
        [(pair["chosen"], *pair["rejected"]) for pair in pairs],
        [f"smollm2-arith-pairs:{pair['index']}" for pair in pairs],
        tokenizer,
        max_length=preset.task.max_length,
    )
    return examples, counts


def _sample_pairs(preset: SmolLM2ArithPreset, model, tokenizer, problems, progress: bool):
    records = arithmetic_records(problems)
    print(
        f"[compare] sampling {preset.samples} answers for each of {len(problems)} preference prompts",
        file=sys.stderr,
    )
    samples = generate(
        model,
        tokenizer,
        [record.prompt for record in records],
        max_new_tokens=preset.task.max_new_tokens,
        stop=["\n"],
        batch_size=max(1, preset.generation_batch_size // preset.samples),
        num_samples=preset.samples,
        temperature=1.0,
        seed=preset.sft.seed,
        progress=progress,
    )
    rewards = [
        [float(arithmetic.is_correct(text, problem.answer)) for text in texts]
        for texts, problem in zip(samples, problems)
    ]
    pairs, stats = build_pairs(records, [[t.strip() for t in texts] for texts in samples], rewards)
    counts = dataclasses.asdict(stats)
    counts["sample_accuracy"] = sum(map(sum, rewards)) / max(1, sum(map(len, rewards)))
    print(f"[compare] pairs from the start's samples: {counts}", file=sys.stderr)
    rows = [
        {"index": int(pair.source.rsplit(":", 1)[1]), "prompt": pair.prompt, "chosen": pair.chosen,
         "rejected": list(pair.rejected)}
        for pair in pairs
    ]  # fmt: skip
    return rows, counts


# What a start's weights depend on; the stopping rule (min/max segments, min gain) may change between
# invocations: a larger --sft-steps continues the same trajectory where the last one stopped.
TRAJECTORY_FIELDS = ("segment_steps", "batch_size", "learning_rate", "train_problems", "seed")


def _identity(source: str, settings: PlateauSFT, task: DefaultTask) -> dict[str, Any]:
    fields = dataclasses.asdict(settings)
    return {"source": source, "sft": {k: fields[k] for k in TRAJECTORY_FIELDS}, "task": repr(task)}


def _same_trajectory(recorded: dict[str, Any], identity: dict[str, Any]) -> bool:
    sft = {k: v for k, v in recorded.get("sft", {}).items() if k in TRAJECTORY_FIELDS}
    return {**recorded, "sft": sft} == identity


def stopping(curve: list[dict[str, float]], settings: PlateauSFT) -> str | None:
    """Why SFT stops after ``curve`` (step 0 first): 'plateau' (the last segment gained less than
    ``min_gain`` after ``min_segments``), 'max_segments' (still rising), or None (go on)."""
    segments = len(curve) - 1
    if segments >= settings.min_segments and segments >= 1:
        gain = curve[-1]["validation_accuracy"] - curve[-2]["validation_accuracy"]
        if gain < settings.min_gain:
            return "plateau"
    return "max_segments" if segments >= settings.max_segments else None


def _sft_examples(preset: SmolLM2ArithPreset, tokenizer) -> list[TokenizedExample]:
    problems = start_problems(preset.sft.train_problems, preset.sft.seed, preset.task)
    examples, _ = tokenize_examples(
        [p.prompt for p in problems],
        [(p.solution,) for p in problems],
        [f"smollm2-arith-sft:{i}" for i in range(len(problems))],
        tokenizer,
        max_length=preset.task.max_length,
    )
    return examples


def _segment_options(preset: SmolLM2ArithPreset, source: str, folder: Path, steps: int, progress: bool):

    settings = preset.sft
    return SFTOptions(
        model=source,
        output_dir=str(folder),
        max_steps=steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler="constant",  # with no warmup: a later, longer segment continues this one exactly
        warmup_ratio=0.0,
        logging_steps=10,
        save_steps=settings.segment_steps,
        save_total_limit=1,
        seed=settings.seed,
        progress=progress,
        max_length=preset.task.max_length,
        resume="latest" if list_checkpoints(folder) else None,
    )


def plateau_sft(preset: SmolLM2ArithPreset, source: str, validation, folder: Path, progress: bool) -> Path:
    """Fine-tune ``source`` in segments until validation accuracy plateaus; returns the start folder.

    Resumable: a finished start is reused, an interrupted segment resumes from its checkpoint, the
    measured segments are not measured again, and a larger ``max_segments`` continues a start that
    stopped at the old limit."""

    settings = preset.sft
    record_path = folder / PLATEAU_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    identity = _identity(source, settings, preset.task)
    if record and not _same_trajectory(record.get("identity", {}), identity):
        raise_mismatch(folder)
    record = record or {"identity": identity, "curve": []}
    if record["curve"] and (reason := stopping(record["curve"], settings)):
        print(f"[compare] SFT start: reused {folder} ({record['curve'][-1]}, {reason})", file=sys.stderr)
        return folder
    tokenizer = load_tokenizer(source)
    examples = _sft_examples(preset, tokenizer)
    if not record["curve"]:
        accuracy = greedy_accuracy(preset, load_model(source), tokenizer, validation)
        record["curve"].append({"step": 0, "validation_accuracy": accuracy})
        print(f"[compare] SFT start: step 0, validation accuracy {accuracy:.1%}", file=sys.stderr)
    while not (reason := stopping(record["curve"], settings)):
        steps = record["curve"][-1]["step"] + settings.segment_steps
        model = load_model(source)
        print(f"[compare] SFT start: steps to {steps}", file=sys.stderr)
        options = _segment_options(preset, source, folder, steps, progress)
        sft_on_examples(options, model, tokenizer, examples, checkpoint_last=True)
        accuracy = greedy_accuracy(preset, model, tokenizer, validation)
        gain = accuracy - record["curve"][-1]["validation_accuracy"]
        record["curve"].append({"step": steps, "validation_accuracy": accuracy})
        record["stopped"] = stopping(record["curve"], settings)
        record["done"] = record["stopped"] is not None
        print(
            f"[compare] SFT start: step {steps}, validation accuracy {accuracy:.1%} ({gain:+.1%})"
            + (f" - stop: {record['stopped']}" if record["stopped"] else ""),
            file=sys.stderr,
        )
        atomic_write_json(record_path, record)
    return folder


def raise_mismatch(folder: Path) -> None:

    raise OptionError(
        f"{folder / PLATEAU_FILE}: this output folder's SFT start was made from another model or other "
        "settings; use a new --output-dir"
    )
