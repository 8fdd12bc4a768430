"""Online MIO (and online DPO) against TRL's GRPOTrainer and RLOOTrainer on the built-in arithmetic task.

    python benchmarks/online_vs_trl.py --out runs/online-vs-trl                 # current built-in SFT start
    python benchmarks/online_vs_trl.py --start builtin:arith --out runs/x       # any miopt --model value
    python benchmarks/online_vs_trl.py --toy --out /tmp/online-toy              # seconds; what the test runs

Every method starts from the same policy (``--start``: ``sft`` = the cached built-in SFT start that
``miopt online --data arithmetic`` uses today, ``builtin`` = the untrained built-in model, or any
folder / hub id / name ``miopt online --model`` accepts), and sees the same prompts in the same order
(round ``r`` takes the prompts ``miopt.online.pairs.round_prompts`` gives it), the same number of
samples per prompt ``K``, the same sampling settings (temperature, top-p, most new tokens) and the
same reward: the built-in verifier (``miopt.evaluation.answers``' arithmetic check, 1 for a correct
final answer, else 0).

* ``mio`` / ``dpo``: ``miopt online`` (``--objective mio`` / ``dpo``): per round, sample ``K`` per
  prompt, pair each prompt's first correct sample against all its incorrect ones, one epoch of
  preference training on those pairs with batch size ``B`` prompts.
* ``grpo`` / ``rloo``: TRL's ``GRPOTrainer`` / ``RLOOTrainer`` with ``num_generations = K``,
  ``per_device_train_batch_size = B * K`` completions (``B`` prompts a step), ``steps_per_generation
  = P / B`` (one generation batch = one miopt round of ``P`` prompts), ``max_steps = rounds * P / B``,
  no dataset shuffling; TRL's defaults otherwise (GRPO: ``loss_type="dapo"``, ``beta=0``; RLOO:
  ``beta=0.05``). Generation ends at the end-of-sequence token (the SFT start ends every solution
  with it); the reward cuts the completion at the task's stop string (a newline) as miopt does.

Held-out greedy accuracy (the evaluation harness, ``miopt.online.rounds.heldout_accuracy``) is measured
before training and after every round, not counted in the wall time. Reported per point: samples
drawn so far and training wall time (sampling + scoring + updates); for the preference methods also
the chosen log-prob change of each round (the mean over the round's pairs of the chosen response's
summed log-prob after the round's update minus before it). Each method runs in its own subprocess, one after the other, with the
same torch thread count. Output in ``--out``: ``table.md``, ``table.json``, ``curves.png`` and each
method's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's miopt, also for the subprocesses below
METHODS = ("mio", "dpo", "grpo", "rloo")
PREFERENCE = ("mio", "dpo")


@dataclass
class Settings:
    start: str = "sft"
    rounds: int = 5
    prompts_per_round: int = 64
    samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 16
    learning_rate: float = 5e-5
    trl_learning_rate: float | None = None  # None: the same as --learning-rate
    beta: float = 0.5
    eval_limit: int = 500
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHODS))


TOY = {
    "start": "builtin",
    "rounds": 2,
    "prompts_per_round": 4,
    "samples": 4,
    "max_new_tokens": 12,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "eval_limit": 8,
}


# ----------------------------------------------------------------------------------------------
# Shared pieces (used by both sides)


def resolve_start(settings: Settings, work: Path) -> str:
    """A model folder for ``--start`` (TRL needs a folder): ``sft`` -> the start ``miopt online --data
    arithmetic`` uses (the shipped ``builtin:arith``); ``builtin`` -> the untrained built-in model saved
    once; a shipped name -> its package folder; anything else as given."""
    from miopt.model.loading import resolve_model

    if settings.start == "sft":
        from miopt.online.rounds import OnlineOptions, _starting_policy

        return resolve_model(_starting_policy(OnlineOptions(model=None, data="arithmetic"), progress=False))
    if settings.start == "builtin":
        folder = work / "start-builtin"
        if not (folder / "config.json").is_file():
            from miopt.model.builtin import build_model, build_tokenizer

            tokenizer = build_tokenizer()
            build_model(tokenizer, seed=settings.seed).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        return str(folder)
    return resolve_model(settings.start)


def task_records(settings: Settings):
    """(the prompts of rounds 1..R in order, the held-out records): as ``miopt online`` picks them."""
    from miopt.online.pairs import round_prompts
    from miopt.online.rounds import OnlineOptions, load_task

    task = load_task(OnlineOptions(data="arithmetic", eval_limit=settings.eval_limit))
    ordered = []
    for index in range(1, settings.rounds + 1):
        picks = round_prompts(len(task.records), settings.prompts_per_round, index, settings.seed)
        ordered.extend(task.records[i] for i in picks)
    return ordered, task.heldout


def verifier_reward(completion: str, gold: str) -> float:
    """The built-in verifier on one completion cut at the arithmetic stop string."""
    from miopt.evaluation.answers import check
    from miopt.evaluation.generation import cut_at_stop
    from miopt.evaluation.runner import DEFAULT_STOPS

    return (
        1.0
        if check("arithmetic", cut_at_stop(completion, DEFAULT_STOPS["arithmetic"]), gold).correct
        else 0.0
    )


# ----------------------------------------------------------------------------------------------
# miopt side


def run_miopt(method: str, settings: Settings, start: str, folder: Path, env: dict) -> dict:
    """``miopt online`` in a subprocess; its rounds.jsonl as curve points."""
    command = [
        sys.executable, "-m", "miopt", "online", "--model", start, "--data", "arithmetic",
        "--output-dir", str(folder), "--objective", method, "--beta", str(settings.beta),
        "--rounds", str(settings.rounds), "--samples", str(settings.samples),
        "--prompts-per-round", str(settings.prompts_per_round), "--temperature", str(settings.temperature),
        "--top-p", str(settings.top_p), "--max-new-tokens", str(settings.max_new_tokens),
        "--batch-size", str(settings.batch_size), "--learning-rate", str(settings.learning_rate),
        "--lr-scheduler", "constant", "--warmup-ratio", "0", "--max-length", "128",
        "--eval-limit", str(settings.eval_limit), "--eval-every", "1", "--seed", str(settings.seed),
        "--progress", "false", "--logging-steps", "1",
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line.strip()]
    points, seconds = [], 0.0
    for row in rows:
        if row["round"] > 0:
            seconds += row["seconds_sampling"] + row["seconds_training"]
        points.append(
            {
                "round": row["round"],
                "samples": row["round"] * settings.prompts_per_round * settings.samples,
                "seconds": round(seconds, 2),
                "heldout_accuracy": row.get("heldout_accuracy"),
                "pass@1_sampled": row.get("pass@1"),
            }
        )
    changes = chosen_logp_changes(folder, settings.rounds)
    for point in points:
        point["chosen_logp_change"] = changes.get(point["round"])
    return {"method": method, "points": points}


def chosen_logp_changes(folder: Path, rounds: int) -> dict[int, float]:
    """Per round, the mean change of the chosen responses' summed log-prob over the round's update:
    ``log pi_r(y_w | x) - log pi_{r-1}(y_w | x)`` on that round's pairs (``pairs.jsonl``)."""
    import torch

    from miopt.data.tokenize import collate, tokenize_examples
    from miopt.logprobs.forward import pair_logps
    from miopt.model.loading import load_model, load_tokenizer
    from miopt.online.output import round_dir

    start = json.loads((folder / "online.json").read_text())["start_model"]
    previous_path = str(round_dir(folder, 0)) if start == "builtin" else start
    tokenizer = load_tokenizer(previous_path)
    changes: dict[int, float] = {}
    previous = load_model(previous_path, tokenizer).eval()
    for index in range(1, rounds + 1):
        current = load_model(str(round_dir(folder, index)), tokenizer).eval()
        pairs = [
            json.loads(line) for line in (round_dir(folder, index) / "pairs.jsonl").read_text().splitlines()
        ]
        examples, _ = tokenize_examples(
            [p["prompt"] for p in pairs],
            [(p["chosen"],) for p in pairs],
            [""] * len(pairs),
            tokenizer,
            max_length=128,
        )
        deltas = []
        with torch.no_grad():
            for offset in range(0, len(examples), 16):
                batch = collate(examples[offset : offset + 16], tokenizer.pad_token_id)
                after, before = pair_logps(current, batch).chosen, pair_logps(previous, batch).chosen
                deltas.extend((after - before).tolist())
        if deltas:
            changes[index] = sum(deltas) / len(deltas)
        previous = current
    return changes


# ----------------------------------------------------------------------------------------------
# TRL side (runs inside its own subprocess: --trl-side)


def run_trl_side(method: str, settings: Settings, start: str, folder: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from miopt.online.rounds import heldout_accuracy

    prompts, heldout = task_records(settings)
    tokenizer = AutoTokenizer.from_pretrained(start)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(start)
    dataset = Dataset.from_list([{"prompt": record.prompt, "gold": record.gold} for record in prompts])

    def reward(prompts, completions, gold, **_):
        return [verifier_reward(text, answer) for text, answer in zip(completions, gold)]

    steps_per_round = settings.prompts_per_round // settings.batch_size
    common = dict(
        output_dir=str(folder),
        per_device_train_batch_size=settings.batch_size * settings.samples,
        gradient_accumulation_steps=1,
        num_generations=settings.samples,
        steps_per_generation=steps_per_round,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        learning_rate=settings.trl_learning_rate or settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=settings.rounds * steps_per_round,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        shuffle_dataset=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=True,
    )
    if method == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    points: list[dict] = []
    clock = {"start": 0.0, "excluded": 0.0}

    def evaluate(model, round_index: int) -> None:
        paused = time.perf_counter()
        was_training = model.training
        model.eval()
        accuracy = heldout_accuracy(model, tokenizer, heldout, max_new_tokens=settings.max_new_tokens)
        model.train(was_training)
        seconds = paused - clock["start"] - clock["excluded"] if round_index else 0.0
        points.append(
            {
                "round": round_index,
                "samples": round_index * settings.prompts_per_round * settings.samples,
                "seconds": round(seconds, 2),
                "heldout_accuracy": accuracy,
            }
        )
        clock["excluded"] += time.perf_counter() - paused

    class RoundEvaluation(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock["start"] = time.perf_counter()
            evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % steps_per_round == 0:
                evaluate(model, state.global_step // steps_per_round)

    trainer = Trainer(
        model=model,
        reward_funcs=reward,
        args=Config(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[RoundEvaluation()],
    )
    trainer.train()
    return {"method": method, "points": points}


def run_trl(method: str, settings: Settings, start: str, folder: Path, env: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"settings": asdict(settings), "start": start}))
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-side", method, "--spec", str(spec)]
    subprocess.run(command, env=env, check=True, cwd=ROOT)
    return json.loads((folder / "curve.json").read_text())


# ----------------------------------------------------------------------------------------------
# Table and plot


def summarise(result: dict) -> dict:
    points = result["points"]
    first, last = points[0], points[-1]
    row = {
        "method": result["method"],
        "heldout_start": first["heldout_accuracy"],
        "heldout_final": last["heldout_accuracy"],
        "heldout_best": max(p["heldout_accuracy"] for p in points if p["heldout_accuracy"] is not None),
        "samples": last["samples"],
        "seconds": last["seconds"],
    }
    changes = [p["chosen_logp_change"] for p in points if p.get("chosen_logp_change") is not None]
    row["chosen_logp_change_mean"] = sum(changes) / len(changes) if changes else None
    row["chosen_logp_change_final"] = changes[-1] if changes else None
    return row


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_outputs(out: Path, settings: Settings, start: str, results: list[dict]) -> list[dict]:
    from miopt.run.atomic_io import atomic_write_json, atomic_write_text

    rows = [summarise(result) for result in results]
    atomic_write_json(
        out / "table.json", {"settings": asdict(settings), "start": start, "rows": rows, "curves": results}
    )
    lines = [
        f"Start `{settings.start}` ({start}); {settings.rounds} rounds x {settings.prompts_per_round} prompts x "
        f"{settings.samples} samples; temperature {settings.temperature}, top-p {settings.top_p}, "
        f"{settings.max_new_tokens} new tokens; held-out greedy accuracy on {settings.eval_limit} problems.",
        "",
        "| method | held-out start | held-out final | best | samples drawn | train wall s | chosen log-p change (mean / final round) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        change = "-"
        if row["chosen_logp_change_mean"] is not None:
            change = f"{row['chosen_logp_change_mean']:+.3f} / {row['chosen_logp_change_final']:+.3f}"
        lines.append(
            f"| {row['method']} | {_cell(row['heldout_start'])} | {_cell(row['heldout_final'])} | "
            f"{_cell(row['heldout_best'])} | {row['samples']} | {_cell(row['seconds'], 1)} | {change} |"
        )
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    plot(out / "curves.png", results, settings)
    return rows


def plot(path: Path, results: list[dict], settings: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from miopt.run.plots import save_figure

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for result in results:
        points = [p for p in result["points"] if p["heldout_accuracy"] is not None]
        for axis, key in zip(axes, ("seconds", "samples")):
            axis.plot(
                [p[key] for p in points],
                [p["heldout_accuracy"] for p in points],
                marker="o",
                label=result["method"],
            )
    axes[0].set_xlabel("training wall time (s)")
    axes[1].set_xlabel("samples drawn")
    for axis in axes:
        axis.set_ylabel("held-out greedy accuracy")
        axis.grid(alpha=0.3)
    axes[1].legend()
    figure.suptitle(f"online methods from start '{settings.start}'")
    save_figure(figure, path)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/online-vs-trl")
    parser.add_argument("--toy", action="store_true", help="tiny sizes from the untrained built-in model")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "methods":
            parser.add_argument(flag, nargs="+", choices=METHODS, default=None)
        else:
            kind = float if name == "trl_learning_rate" else type(value)
            parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side (OMP_NUM_THREADS)")
    parser.add_argument("--trl-side", choices=("grpo", "rloo"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    values = dict(TOY) if args.toy else {}
    values.update({k: v for k, v in vars(args).items() if k in asdict(Settings()) and v is not None})
    settings = Settings(**values)
    if settings.prompts_per_round % settings.batch_size:
        raise SystemExit("--prompts-per-round must be a multiple of --batch-size (TRL steps per round)")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.trl_side:
        spec = json.loads(Path(args.spec).read_text())
        settings = Settings(**spec["settings"])
        folder = Path(args.spec).parent
        result = run_trl_side(args.trl_side, settings, spec["start"], folder)
        (folder / "curve.json").write_text(json.dumps(result))
        return 0
    settings = settings_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = resolve_start(settings, out)
    results = []
    for method in settings.methods:
        folder = out / method
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        print(f"== {method}", file=sys.stderr, flush=True)
        runner = run_miopt if method in PREFERENCE else run_trl
        results.append(runner(method, settings, start, folder, env))
    rows = write_outputs(out, settings, start, results)
    print((out / "table.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
