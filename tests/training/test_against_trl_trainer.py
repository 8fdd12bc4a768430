"""Peer oracle: miopt's training step against TRL's own ``DPOTrainer`` on a real model and batch.

Both libraries load the same tiny model (the built-in character-level Llama of
``miopt.model.builtin.build_model``, narrowed to hidden 64 and 2 layers to keep the test fast, written
with ``save_pretrained`` to a temporary folder) and the same reference model, and score the same
four preference pairs (standard prompt/chosen/rejected strings) with the same beta. On TRL's side
a real ``DPOTrainer`` is built from a ``DPOConfig`` (float32: ``bf16=False``; ``max_length`` far
above the longest sequence, so nothing is truncated; dropout disabled; batch size = all pairs)
and its own ``compute_loss`` runs on the one batch its own train dataloader yields; the metrics
are read back from what TRL logged (``trainer._metrics["train"]``). On miopt's side the real step
function of ``miopt train`` runs with reference log-probs from ``compute_reference_logps``.
miopt's ``dpo`` must give TRL's ``sigmoid`` loss and ``mio`` TRL's ``nca_pair`` loss, with the
same ``logps/*``, ``rewards/*`` metrics (absolute tolerance 1e-4) and the same gradient with
respect to every weight; so must TRL's modifiers ``use_weighting`` (WPO) and ``ld_alpha`` (LD-DPO),
miopt's LD reference coming from the tail sums of its cache. The metric definitions agree for one rejected response per prompt:
both report summed (not length-averaged) response log-probs and ``beta * (log pi - log pi_ref)``
rewards; miopt's ``rewards/rejected`` and ``rewards/margins`` average over the K rejected
responses of a prompt first, which is TRL's value when K = 1.

Tokenisation. Both tokenise the prompt with the tokenizer's special tokens, which for the
built-in tokenizer add nothing (it has no BOS post-processor), so neither sequence starts with
BOS. TRL appends the EOS *string* ``</s>`` to each plain-text response and tokenises
``prompt + response + "</s>"``; miopt tokenises the response alone and appends the EOS *id*.
The built-in tokenizer reads ``</s>`` as the single EOS token and has one token per character
(no merges across the prompt/response boundary), so both libraries see identical token ids.
The test asserts this (per example, and for the rows of the two collated batches) rather than
assuming it: a change in either library's tokenisation fails here loudly instead of showing up
as a small numeric mismatch.

Reference. With the reference equal to the policy every reward is exactly zero and the losses
are constants (log 2 for DPO, log 4 for MIO), which would test nothing about the log-ratios.
So the reference is the built-in model and the policy is the same model with fixed Gaussian
noise added to every weight (a stand-in for a partly trained policy); both are saved folders,
loaded by each library separately (TRL patches the forward of the models it is given).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed")
pytest.importorskip("datasets", reason="datasets is not installed (needed by trl)")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from miopt import objectives  # noqa: E402
from miopt.data.records import PreferenceRecord  # noqa: E402
from miopt.data.tokenize import collate, tokenize_preferences  # noqa: E402
from miopt.logprobs.forward import DEFAULT_CHUNK_TOKENS  # noqa: E402
from miopt.logprobs.reference import compute_reference_logps  # noqa: E402
from miopt.model.builtin import build_model, build_tokenizer  # noqa: E402
from miopt.training.preference import PreferenceData, make_step_function  # noqa: E402

TOL = {"rel": 0, "abs": 1e-4}  # absolute, on float32 values of magnitude <= ~100
MAX_LENGTH = 512  # far above the longest prompt + response below (asserted)

PAIRS = [
    {"prompt": "Q: 2+3=?\nA: ", "chosen": "2+3=5. The answer is 5.", "rejected": "6"},
    {"prompt": "Q: 7*6=?\nA: ", "chosen": "42", "rejected": "7*6=48, so the answer is 48."},
    {"prompt": "Name a colour.\n", "chosen": "Blue.", "rejected": "A colour is a number."},
    {"prompt": "Say hi: ", "chosen": "hi there!", "rejected": "bye"},
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(policy folder, reference folder): the built-in model, and it plus fixed noise."""
    root = tmp_path_factory.mktemp("trl-oracle")
    tokenizer = build_tokenizer()
    reference = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0)
    policy = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    paths = root / "policy", root / "reference"
    for model, path in zip((policy, reference), paths):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return paths


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def trl_side(policy_dir, reference_dir, output_dir, loss_type, beta, modifiers=None):
    """TRL's loss (with its graph), logged metrics and collated batch for one batch of all pairs, and the trainer."""
    with warnings.catch_warnings():
        # TRL 1.16 sets gradient_checkpointing, a name transformers 5 deprecates, and calls deprecated helpers:
        # FutureWarnings of the two libraries between themselves, not this test's concern.
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(
            output_dir=str(output_dir),
            report_to="none",
            beta=beta,
            loss_type=[loss_type],
            max_length=MAX_LENGTH,
            per_device_train_batch_size=len(PAIRS),
            disable_dropout=True,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            **(modifiers or {}),
        )
        trainer = DPOTrainer(
            model=load(policy_dir),
            ref_model=load(reference_dir),
            args=args,
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=AutoTokenizer.from_pretrained(policy_dir),
        )
        batches = list(trainer.get_train_dataloader())
        assert len(batches) == 1, "every pair must be in the one batch"
        batch = batches[0]
        trainer.model.train()  # from_pretrained returns eval mode; TRL logs under "train" only in train mode
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return trainer, loss, metrics, batch


def miopt_side(policy_dir, reference_dir, objective_name, beta, modifiers=None):
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    records = [
        PreferenceRecord(pair["prompt"], pair["chosen"], (pair["rejected"],), f"pairs:{index}")
        for index, pair in enumerate(PAIRS)
    ]
    examples, report = tokenize_preferences(records, tokenizer, max_length=MAX_LENGTH)
    assert report.truncated == 0 and report.skipped == 0
    pad = tokenizer.pad_token_id
    reference = compute_reference_logps(
        load(reference_dir), examples, pad, chunk_tokens=DEFAULT_CHUNK_TOKENS, progress=False
    )
    model = load(policy_dir)
    model.train()
    modifiers = modifiers or {}
    step = make_step_function(
        objectives.build(objective_name, modifiers),
        PreferenceData(examples, reference),
        beta=beta,
        pad_token_id=pad,
        chunk_tokens=DEFAULT_CHUNK_TOKENS,
        ld_alpha=modifiers.get("ld_alpha"),
    )
    loss, metrics = step(model, list(range(len(examples))))
    return model, loss, metrics, examples, pad


def batch_rows(input_ids, attention_mask, completion_mask):
    """(prompt ids, completion ids) of every row of a right-padded batch."""
    rows = []
    for ids, attention, completion in zip(
        input_ids.tolist(), attention_mask.tolist(), completion_mask.tolist()
    ):
        length = sum(attention)
        prompt = tuple(i for i, c in zip(ids[:length], completion[:length]) if not c)
        response = tuple(i for i, c in zip(ids[:length], completion[:length]) if c)
        assert ids[: len(prompt)] == list(prompt), "prompt tokens must precede the completion"
        rows.append((prompt, response))
    return rows


@pytest.mark.parametrize(
    ("objective_name", "loss_type", "beta", "modifiers"),
    [
        ("dpo", "sigmoid", 0.1, {}),
        ("dpo", "sigmoid", 0.5, {}),
        ("mio", "nca_pair", 0.1, {}),
        ("mio", "nca_pair", 0.5, {}),
        # TRL's modifiers: WPO weights from miopt's chunked head; LD-DPO with the reference's tail sums
        # from miopt's cache against TRL's reference forward.
        ("dpo", "sigmoid", 0.5, {"use_weighting": True}),
        ("dpo", "sigmoid", 0.5, {"ld_alpha": 0.3}),
        ("mio", "nca_pair", 0.5, {"ld_alpha": 0.6, "use_weighting": True}),
    ],
)
def test_step_matches_trl_dpo_trainer(model_dirs, tmp_path, objective_name, loss_type, beta, modifiers):
    policy_dir, reference_dir = model_dirs
    trainer, trl_loss, trl_metrics, trl_batch = trl_side(
        policy_dir, reference_dir, tmp_path, loss_type, beta, modifiers
    )
    model, loss, metrics, examples, pad = miopt_side(
        policy_dir, reference_dir, objective_name, beta, modifiers
    )

    # Same token ids per example (TRL's tokenised dataset keeps the original order) ...
    tokenised = trainer.train_dataset
    assert len(tokenised) == len(examples) == len(PAIRS)
    for row, example in zip(tokenised, examples):
        assert tuple(row["prompt_ids"]) == example.prompt_ids
        assert tuple(row["chosen_ids"]) == example.chosen_ids
        assert (tuple(row["rejected_ids"]),) == example.rejected_ids
        assert example.chosen_ids[-1] == example.rejected_ids[0][-1] == trainer.processing_class.eos_token_id
        assert trainer.processing_class.bos_token_id not in example.prompt_ids
    # ... and the same sequences in the two batches (TRL's may be in another order; means do not care).
    ours = collate(examples, pad)
    assert ours.input_ids.shape[1] < MAX_LENGTH
    trl_rows = batch_rows(trl_batch["input_ids"], trl_batch["attention_mask"], trl_batch["completion_mask"])
    miopt_rows = batch_rows(ours.input_ids, ours.attention_mask, ours.response_mask)
    assert sorted(trl_rows) == sorted(miopt_rows)
    half = len(PAIRS)
    trl_pairs = sorted(zip(trl_rows[:half], trl_rows[half:]))
    assert trl_pairs == sorted(zip(miopt_rows[:half], miopt_rows[half:])), "chosen/rejected pairing differs"

    # A meaningful comparison: the rewards are far from zero and the pairs are not all ordered alike ...
    assert abs(metrics["rewards/margins"].item()) > 1e-2
    assert 0.0 < trl_metrics["rewards/accuracies"] < 1.0

    for name in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], **TOL), name
    assert metrics["rewards/accuracies"].item() == trl_metrics["rewards/accuracies"]
    assert loss.item() == pytest.approx(trl_loss.item(), **TOL)
    # ... and the loss is not the constant it takes at zero rewards (log 2 for DPO, log 4 for MIO).
    assert abs(loss.item() - math.log(2 if objective_name == "dpo" else 4)) > 100 * TOL["abs"]

    # The same gradient with respect to every weight.
    trl_loss.backward()
    loss.backward()
    theirs = dict(trainer.model.named_parameters())
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and theirs[name].grad is not None, name
        reference = theirs[name].grad
        scale = reference.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(
            parameter.grad, reference, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
