"""Token files: `sparsemup tokenize` (a local byte-level BPE), the trainer reading them with the data's vocabulary
and bits per byte through the recorded bytes per token, and the bad inputs refused before training."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="tokenizers is not installed: pip install 'sparsemup[hf]'")

from helpers import known, tiny_config  # noqa: E402
from sparsemup.cli import main  # noqa: E402
from sparsemup.train import ConfigError, build_model  # noqa: E402
from sparsemup.train.data import load_corpus, token_files  # noqa: E402
from sparsemup.train.tokenize import load_tokenizer, tokenize_corpus, write_token_files  # noqa: E402
from sparsemup.train.trainer import Completed, train  # noqa: E402
from sparsemup.train.validate import validate  # noqa: E402


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    assert main(["tokenize", str(corpus), "--vocab", "300", "--out", str(out)]) == 0
    return out


def test_tokenize_round_trips_and_records_bytes_per_token(corpus, bpe):
    files = token_files(str(bpe))
    assert files is not None and files.vocab_size == 300 and files.dtype == "uint16"
    data = load_corpus(str(bpe), 0.1, 16)
    text = {"train": "", "val": ""}
    for file in sorted(corpus.glob("*.txt")):
        raw = file.read_text()
        cut = len(raw) - int(len(raw) * 0.1)
        text["train"] += raw[:cut]
        text["val"] += raw[cut:]
    tokenizer = load_tokenizer(files)
    for split, ids in (("train", data.train), ("val", data.val)):
        assert tokenizer.decode(ids.tolist()) == text[split]
        assert files.bytes_per_token[split] == pytest.approx(len(text[split].encode()) / len(ids))
    assert 1.5 < files.bytes_per_token["train"] < 8  # merges happened
    # a local tokenizer.json gives the same files
    again = tokenize_corpus(str(corpus), bpe.parent / "again", tokenizer=bpe / "tokenizer.json")
    assert again.tokens == files.tokens and again.vocab_size == 300
    # uint32 above 65536 tokens, read back as written
    big_ids = {"train": np.array([0, 70000, 5, 6]), "val": np.array([1, 2, 3])}
    big = write_token_files(bpe.parent / "big", big_ids, 70001, "", {"train": 8, "val": 3})
    assert big.dtype == "uint32" and load_corpus(str(big.folder), 0.1, 2).train.tolist() == [0, 70000, 5, 6]


def test_trainer_uses_the_data_vocabulary_and_bits_per_byte(bpe, tmp_path):
    cfg = tiny_config(bpe, "train.steps=2", "train.eval_every=0")
    model = build_model(cfg)
    assert any(p.shape[0] == 300 for p in model.parameters())
    result = train(cfg, tmp_path / "run")
    assert isinstance(result, Completed)
    per_token = known(token_files(str(bpe))).bytes_per_token["val"]
    assert result.final_val_bits_per_byte == pytest.approx(result.final_val_loss / math.log(2) / per_token)


def _copy(bpe, tmp_path, **changes):
    folder = tmp_path / "tokens"
    folder.mkdir(parents=True)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        (folder / name).write_bytes((bpe / name).read_bytes())
    meta = {**json.loads((bpe / "tokens.json").read_text()), **changes}
    (folder / "tokens.json").write_text(json.dumps(meta))
    return folder


def test_bad_token_data_is_refused_before_training(corpus, bpe, tmp_path):
    with pytest.raises(ConfigError, match="holds token files.*data.format = 'tokens'"):
        validate(tiny_config(bpe, "data.format=text"), 1)
    with pytest.raises(ConfigError, match="data.format = 'tokens' but .* is text.*sparsemup tokenize"):
        validate(tiny_config(corpus, "data.format=tokens"), 1)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "train.bin").write_bytes((bpe / "train.bin").read_bytes())
    with pytest.raises(ConfigError, match="without tokens.json"):
        validate(tiny_config(lone / "train.bin"), 1)
    with pytest.raises(ConfigError, match="does not match its files: train.bin holds"):
        validate(tiny_config(_copy(bpe, tmp_path / "a", tokens={"train": 5, "val": 7})), 1)
    with pytest.raises(ConfigError, match="uint16 cannot hold"):
        validate(tiny_config(_copy(bpe, tmp_path / "b", vocab_size=70000)), 1)
    with pytest.raises(ConfigError, match="not a token-file record"):
        validate(tiny_config(_copy(bpe, tmp_path / "c", bytes_per_token={"train": 2.0})), 1)
    small = _copy(bpe, tmp_path / "d", vocab_size=200)
    with pytest.raises(ConfigError, match="holds token id 2[0-9][0-9], not below the vocabulary of 200"):
        train(tiny_config(small), tmp_path / "run-d")
    empty = tmp_path / "empty"
    write_token_files(empty, {"train": np.array([1, 2, 3] * 20), "val": np.array([1])}, 300, "", {"train": 60,
                                                                                               "val": 1})
    (empty / "val.bin").write_bytes(b"")
    meta = json.loads((empty / "tokens.json").read_text())
    (empty / "tokens.json").write_text(json.dumps({**meta, "tokens": {"train": 60, "val": 0}}))
    with pytest.raises(ConfigError, match="val.bin is empty"):
        validate(tiny_config(empty), 1)
    assert main(["tokenize", str(corpus), "--vocab", "100", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("data", ["bytes", "bpe"])
def test_sample_is_deterministic_under_a_seed(corpus, bpe, tmp_path, capsys, data):
    train(tiny_config(bpe if data == "bpe" else corpus, "train.steps=2", "train.eval_every=0"), tmp_path / "run")
    texts = []
    for seed in (5, 5, 6):
        assert main(["sample", str(tmp_path / "run"), "--prompt", "the king", "--tokens", "24", "--seed",
                     str(seed)]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]
    assert all(text.startswith("the king") and len(text) > len("the king") + 10 for text in texts)
    assert main(["sample", str(tmp_path / "run"), "--prompt", "", "--tokens", "4"]) == 2


def test_an_hf_config_json_must_hold_the_token_vocabulary(bpe, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                       "pip install 'sparsemup[hf]'")
    template = transformers.AutoConfig.for_model(
        "llama", vocab_size=256, num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, max_position_embeddings=16)
    template.save_pretrained(tmp_path / "cfg")
    arch = f"model.arch=hf:{tmp_path / 'cfg' / 'config.json'}"
    with pytest.raises(ValueError, match=r"vocab_size = 256 but the data has 300 tokens.*tokens.json"):
        build_model(tiny_config(bpe, arch, "model.head_dim=16"))
    template.vocab_size = 300  # as the error says: then it builds, with the data's vocabulary
    template.save_pretrained(tmp_path / "cfg")
    model = build_model(tiny_config(bpe, arch, "model.head_dim=16"))
    assert isinstance(model, transformers.PreTrainedModel)
    assert model.get_input_embeddings().weight.shape[0] == 300
