"""GGUF models (:mod:`miopt.model.gguf`): a tiny Llama written as GGUF here (llama.cpp's layout: permuted
q/k rows, ``blk.N.*`` names, a byte-level BPE vocabulary in the metadata) reads back as the model it
came from, converts once to a plain safetensors folder, and trains and evaluates through the CLI;
broken inputs fail with one located line before any work."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

gguf_package = pytest.importorskip("gguf")  # the miopt[gguf] extra

import numpy as np  # noqa: E402
import transformers  # noqa: E402

from miopt.cli import main  # noqa: E402
from miopt.errors import OptionError  # noqa: E402
from miopt.model import gguf  # noqa: E402
from miopt.model import loading as models  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 128, 2, 4, 2, 128
ROPE_THETA = 50_000.0  # not LlamaConfig's default (10,000): seen only if read from the file
RMS_EPS = 1e-5  # not LlamaConfig's default (1e-6); float32 in the file
CORPUS = [
    "Q: What is 12 + 7? A: 19.",
    "The cat sat on the mat, twice! Then it sat again.",
    "x = (3 * 4) - 5; y = x / 2 # comment",
    "hello world 2024, hello again 1999.",
    "Q: 98-54-6-34=?\n98-54=44. 44-6=38. 38-34=4. A: 4",
]
TEXTS = [  # digits, runs of spaces, tabs and newlines, punctuation, non-ASCII, a special token inside text
    "Q: 46+75-28+65=?\n",
    "  two  spaces,\ttabs\tand\n\nnewlines  ",
    "3.14159 -42 1000000 007",
    "Hello, world! (ok?) [x] {y} <tag> a_b-c",
    "naïve café — ünïcödé",
    "the end</s>and more",
]
SEQUENCES = [[5, 40, 100, 7, 290, 3, 77], [1, 2], list(range(4, 60, 3))]


@dataclass(frozen=True)
class Source:
    """A model and tokenizer, and the GGUF file written from them."""

    model: transformers.LlamaForCausalLM
    tokenizer: transformers.PreTrainedTokenizerFast
    path: Path


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``LlamaModel.permute``): per head, the two
    rotary halves of Hugging Face's ``rotate_half`` become interleaved pairs. transformers'
    ``LlamaTensorProcessor._reverse_permute_weights`` undoes it on load."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def tiny_tokenizer():
    """A byte-level BPE of ~300 tokens; GPT-2's pre-tokenizer (what a GGUF ``gpt2`` vocabulary with no
    ``tokenizer.ggml.pre`` gets), so digits are not split one per token."""
    from miopt.experiments.gsm8k_model import train_tokenizer

    return train_tokenizer(CORPUS * 10, vocab_size=300, split_digits=False)


def tiny_llama(tokenizer, *, tied: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
    """Random weights of unit scale (norms around 1, not exactly 1), so that a misplaced or misordered
    tensor changes the logits well beyond float32 rounding."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator = torch.Generator().manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if parameter.ndim == 1 else 0.3 * noise)
    return model


def write_gguf(path: Path, model, tokenizer, *, architecture: str = "llama", permute: bool = True) -> Path:
    """``model`` and ``tokenizer`` as an F32 GGUF file, with the metadata llama.cpp's converter writes."""
    config = model.config
    writer = gguf_package.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_file_type(gguf_package.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(len(tokenizer))

    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf_package.TokenType.CONTROL if i in special else gguf_package.TokenType.NORMAL
            for i in range(len(tokens))
        ]
    )
    writer.add_token_merges([" ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)

    names = gguf_package.get_tensor_name_map(gguf_package.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        array = tensor.detach().numpy().astype(np.float32)
        if permute and gguf_name.endswith(".attn_q.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif permute and gguf_name.endswith(".attn_k.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[bool, Source]:
    """An untied and a tied tiny Llama (same tokenizer), each written once as GGUF."""
    folder = tmp_path_factory.mktemp("gguf-sources")
    tokenizer = tiny_tokenizer()
    built = {}
    for tied in (False, True):
        model = tiny_llama(tokenizer, tied=tied, seed=int(tied))
        name = "tied.gguf" if tied else "tiny.gguf"
        built[tied] = Source(model, tokenizer, write_gguf(folder / name, model, tokenizer))
    return built


@pytest.fixture(scope="session")
def source(sources) -> Source:
    return sources[False]


@pytest.fixture
def gguf_copy(source, tmp_path) -> Path:
    """A private copy of the tiny GGUF (tests that rewrite or touch it)."""
    return Path(shutil.copy(source.path, tmp_path / "copy.gguf"))


def cache_gguf_dir() -> Path:
    return Path(os.environ["MIOPT_CACHE"]) / "gguf"


def leftovers(folder: Path) -> list[str]:
    """Temporary folders of interrupted or failed conversions."""
    return sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []


def assert_same_parameters(model, expected) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name  # F32 in the file: exact


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# --- reading the file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_load_model_reads_back_the_model_the_file_was_written_from(sources, tied):
    source = sources[tied]
    model = models.load_model(str(source.path))
    config, expected = model.config, source.model.config
    assert type(model) is transformers.LlamaForCausalLM
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (HIDDEN, FFN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, 16)
    assert config.vocab_size == expected.vocab_size == len(source.tokenizer)
    assert config.max_position_embeddings == CONTEXT
    assert config.rope_parameters["rope_theta"] == ROPE_THETA
    assert config.rms_norm_eps == pytest.approx(RMS_EPS, rel=1e-6)
    assert config.tie_word_embeddings is tied
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert getattr(config, "quantization_config", None) is None
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_same_parameters(model, source.model)
    model.eval()
    for ids in SEQUENCES:
        torch.testing.assert_close(logits(model, ids), logits(source.model, ids), atol=1e-5, rtol=0)


def test_logits_see_the_rotary_layout(source, tmp_path):
    """Control for the test above: the same tensors written without llama.cpp's q/k permutation load
    with different q/k weights and logits, so matching logits do check the layout."""
    path = write_gguf(tmp_path / "unpermuted.gguf", source.model, source.tokenizer, permute=False)
    model = models.load_model(str(path)).eval()
    layer, expected = model.model.layers[0].self_attn, source.model.model.layers[0].self_attn
    assert not torch.equal(layer.q_proj.weight, expected.q_proj.weight)
    assert not torch.equal(layer.k_proj.weight, expected.k_proj.weight)
    assert torch.equal(layer.v_proj.weight, expected.v_proj.weight)  # v is stored as is
    difference = (logits(model, SEQUENCES[0]) - logits(source.model, SEQUENCES[0])).abs().max()
    assert difference > 1e-2


def test_load_tokenizer_encodes_like_the_source_tokenizer(source):
    tokenizer = models.load_tokenizer(str(source.path))
    assert len(tokenizer) == len(source.tokenizer)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == source.tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids) == text
    assert "</s>" in TEXTS[-1] and tokenizer(TEXTS[-1])["input_ids"].count(2) == 1  # kept whole, as EOS
    specials = ("bos_token", "eos_token", "pad_token", "unk_token")
    assert [getattr(tokenizer, name) for name in specials] == ["<s>", "</s>", "<pad>", "<unk>"]
    assert tokenizer.pad_token_id == source.tokenizer.pad_token_id == 0


def test_tokenizer_has_no_token_past_the_embedding_matrix(source):
    """transformers' GGUF reader adds GPT-2's ``<|endoftext|>`` to a byte-level vocabulary without it,
    at id ``vocab_size``; the converted tokenizer drops it, so no text indexes past the embeddings."""
    tokenizer = models.load_tokenizer(str(source.path))
    vocab_size = models.load_model(str(source.path)).config.vocab_size
    assert len(tokenizer) == vocab_size
    ids = tokenizer("x<|endoftext|>y")["input_ids"]
    assert max(ids) < vocab_size
    assert ids == source.tokenizer("x<|endoftext|>y")["input_ids"]


# --- the converted folder -----------------------------------------------------------------------------


def test_converted_folder_is_a_plain_transformers_folder(source):
    folder = gguf.to_folder(str(source.path))
    assert folder == gguf.converted_dir(str(source.path))
    assert folder.parent == cache_gguf_dir() and folder.name.startswith("tiny-")
    assert (folder / gguf.COMPLETE).is_file() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # no miopt, no gguf_file
    assert_same_parameters(model, source.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == source.tokenizer(text)["input_ids"], text
    assert leftovers(cache_gguf_dir()) == []


def test_second_use_reuses_the_converted_folder(source, monkeypatch):
    first = gguf.to_folder(str(source.path))
    written = (first / "model.safetensors").stat().st_mtime_ns

    def no_second_conversion(spec, folder):
        raise AssertionError(f"converted {spec} again")

    monkeypatch.setattr(gguf, "_convert", no_second_conversion)
    assert gguf.to_folder(str(source.path)) == first
    assert models.resolve_model(str(source.path)) == str(first)
    assert_same_parameters(models.load_model(str(source.path)), source.model)
    assert (first / "model.safetensors").stat().st_mtime_ns == written


def test_a_changed_file_gets_a_new_folder(sources, gguf_copy):
    spec = str(gguf_copy)
    first = gguf.to_folder(spec)
    fingerprint = models.model_fingerprint(spec)
    shutil.copyfile(sources[True].path, gguf_copy)  # rewritten with another model
    second = gguf.to_folder(spec)
    assert second != first and models.model_fingerprint(spec) != fingerprint
    assert json.loads((second / "config.json").read_text())["tie_word_embeddings"] is True  # the new content
    assert_same_parameters(transformers.AutoModelForCausalLM.from_pretrained(second), sources[True].model)
    stat = gguf_copy.stat()
    os.utime(gguf_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, new time
    assert gguf.converted_dir(spec) not in (first, second)
    assert gguf.to_folder(spec) == gguf.converted_dir(spec)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("m.gguf", True), ("a/b/Model.Q4_K_M.GGUF", True), ("model.safetensors", False), ("builtin", False)],
)
def test_is_gguf_goes_by_the_suffix(value, expected):
    assert gguf.is_gguf(value) is expected


def test_split_and_hub_names(tmp_path):
    assert gguf.split("owner/repo/model.Q4_1.gguf") == ("owner/repo", "model.Q4_1.gguf")
    assert gguf.split(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    gguf.check("owner/repo/model.Q4_1.gguf")  # a hub file: nothing local to check yet
    with pytest.raises(OptionError, match="does not exist"):
        gguf.check("./owner/repo/model.gguf")  # a local-looking path


# --- through the CLI ----------------------------------------------------------------------------------


def test_sft_on_a_gguf_model_saves_a_plain_folder(source, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Q: {i}+{i}=?\n", "completion": f"A: {2 * i}"} for i in range(6)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = ["sft", "--model", str(source.path), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--progress", "false"]  # fmt: skip
    assert main(args) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model) is transformers.LlamaForCausalLM
    trained, start = model.state_dict(), source.model.state_dict()
    assert sorted(trained) == sorted(start)
    change = max((trained[name] - start[name]).abs().max().item() for name in start)
    assert change > 1e-4  # two AdamW steps at 1e-3 moved the weights
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == source.tokenizer(text)["input_ids"], text


def test_eval_on_a_gguf_model_matches_the_source_folder(source, tmp_path):
    folder = tmp_path / "source"
    source.model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    predictions = {}
    for name, model in (("gguf", str(source.path)), ("folder", str(folder))):
        out = tmp_path / f"eval-{name}"
        args = ["eval", "--model", model, "--data", "arithmetic", "--limit", "3", "--max-new-tokens", "8",
                "--output-dir", str(out), "--progress", "false", "--device", "cpu"]  # fmt: skip
        assert main(args) == 0
        assert json.loads((out / "summary.json").read_text())["n"] == 3
        predictions[name] = [
            json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()
        ]
    outputs = [row["output"] for row in predictions["gguf"]]
    assert len(outputs) == 3 and any(outputs)
    assert outputs == [row["output"] for row in predictions["folder"]]  # greedy: same weights, same text


# --- errors: one located line, exit status 2, nothing trained -----------------------------------------


def not_gguf(tmp_path, source, monkeypatch):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    return path, [str(path), "not a GGUF file"]


def truncated(tmp_path, source, monkeypatch):
    data = source.path.read_bytes()
    path = tmp_path / "half.gguf"
    path.write_bytes(data[: len(data) // 2])
    return path, [str(path), "damaged or unreadable"]


def unsupported(tmp_path, source, monkeypatch):
    path = write_gguf(tmp_path / "odd.gguf", source.model, source.tokenizer, architecture="made-up-arch")
    return path, [str(path), "unsupported", "made-up-arch"]


def missing(tmp_path, source, monkeypatch):
    path = tmp_path / "nowhere" / "model.gguf"
    return path, [str(path), "does not exist"]


def a_folder(tmp_path, source, monkeypatch):
    path = tmp_path / "folder.gguf"
    path.mkdir()
    return path, [str(path), "not a file"]


def no_gguf_package(tmp_path, source, monkeypatch):
    find_spec = gguf.importlib.util.find_spec
    monkeypatch.setattr(
        gguf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a)
    )
    return source.path, ["miopt[gguf]", "'gguf' package"]


@pytest.mark.parametrize("command", ["sft", "eval"])
@pytest.mark.parametrize("case", [not_gguf, truncated, unsupported, missing, a_folder, no_gguf_package])
def test_bad_gguf_input_fails_with_one_located_line(case, command, source, tmp_path, monkeypatch, capsys):
    path, parts = case(tmp_path, source, monkeypatch)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1=?\n", "completion": "A: 2"}) + "\n")
    out = tmp_path / "out"
    if command == "sft":
        args = ["sft", "--model", str(path), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                "--batch-size", "2", "--progress", "false"]  # fmt: skip
    else:
        args = ["eval", "--model", str(path), "--data", "arithmetic", "--limit", "3", "--output-dir", str(out),
                "--progress", "false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"miopt {command}: error:")]
    assert len(errors) == 1, err
    for part in parts:
        assert part in errors[0], errors[0]
    assert "Traceback" not in err
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "summary.json").exists()
    assert leftovers(cache_gguf_dir()) == []  # a failed conversion leaves no temporary folder
    assert not any(cache_gguf_dir().glob(f"*/{gguf.COMPLETE}"))  # nor a converted one
