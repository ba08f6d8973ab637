"""dsrecipes.train.data and dsrecipes.config.args: the offline tokenizer, the generated corpus, local files, argument
parsing.

Run: .venv/bin/python -m pytest tests/test_data.py -q
"""

import json

import pytest

from dsrecipes.config.args import RECIPES, parse_args
from dsrecipes.config.errors import ConfigError
from dsrecipes.train.data import build_lm_datasets, byte_tokenizer, generated_corpus, load_tokenizer


def data_args(*argv):
    args, _ = parse_args(RECIPES["train_lm"], list(argv))
    return args


def test_byte_tokenizer_roundtrips_any_text():
    tok = byte_tokenizer()
    text = "héllo wörld — 数据 <|endoftext|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) == 257 and tok.eos_token_id == 256 and ids[-1] == 256
    assert max(tok("abc")["input_ids"]) < 256


def test_tokenizer_saves_and_reloads(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok("xyz")["input_ids"] == [120, 121, 122]


def test_generated_corpus_is_deterministic_and_split():
    a, b = generated_corpus(50, 7, 8), generated_corpus(50, 7, 8)
    assert a == b
    assert generated_corpus(50, 7, 9) != a  # other documents, same language
    assert set(generated_corpus(50, 7, 9)[0].replace(".", "").split()) <= {
        w.rstrip(".") for d in a + generated_corpus(500, 7, 10) for w in d.split()
    }


def test_generated_dataset_blocks_and_entropy():
    train, evl, info = build_lm_datasets(
        data_args("--generated_docs", "200", "--eval_docs", "20", "--block_size", "64"), byte_tokenizer()
    )
    assert info["block_size"] == 64 and len(train) == info["train_blocks"] > 100 and len(evl) > 5
    row = train[0]
    assert row["input_ids"].shape == (64,) and (row["input_ids"] == row["labels"]).all()
    assert 2.0 < info["unigram_entropy"] < 3.5


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path, fmt):
    docs = generated_corpus(120, 3, 4)
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(docs))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    else:
        import datasets

        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    train, evl, info = build_lm_datasets(
        data_args("--dataset", str(path), "--eval_fraction", "0.1", "--block_size", "32"), byte_tokenizer()
    )
    assert len(train) > len(evl) > 0


def test_wrong_text_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "hello " * 50}) + "\n")
    with pytest.raises(ConfigError, match="text_column: 'text' is not a column"):
        build_lm_datasets(data_args("--dataset", str(path)), byte_tokenizer())


def test_yaml_plus_cli_override(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("max_steps: 7\nlearning_rate: 0.01\nfreeze_patterns: [wte]\n")
    args, path = parse_args(RECIPES["train_lm"], ["--config", str(cfg), "--max_steps", "9"])
    assert (args.max_steps, args.learning_rate, args.freeze_patterns, path) == (9, 0.01, ["wte"], str(cfg))


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        ("max_step: 3\n", "max_step: unknown key; remove it or fix the spelling (did you mean one of ['max_steps']?)"),
        ("max_steps: 2.5\n", "max_steps: expected an integer"),
        ("optimizer: sgd\n", "optimizer: 'sgd' is not one of"),
        ("export_final: 'yes'\n", "export_final: expected true/false"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_recipe_values(tmp_path, yaml_text, needle):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        parse_args(RECIPES["train_lm"], ["--config", str(cfg)])
    assert needle in exc.value.line() and exc.value.line().startswith(f"error: {cfg}: ")
