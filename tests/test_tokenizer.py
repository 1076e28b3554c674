"""tokenizer.py: exact round trips, save/load, special tokens, the chat template, determinism,
and clear errors for bad files and an uncached gpt2 encoding."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import regex
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tokenizer import (GPT2_PATTERN, SPECIAL_TOKENS, _merge, decode_response, encode_prompt,  # noqa: E402
                       encode_response, load_tokenizer, save_tokenizer, special_id, train_bpe)

VOCAB = 320


def make_corpus(n=300, seed=0):
    """A few KB of sentences in the style of the tiny world."""
    rng = random.Random(seed)
    names = ["braitep", "beemp", "kwex", "milt", "snoolt", "glaik"]
    things = ["grass", "honey", "berries", "fish", "nuts"]
    places = ["forest", "cave", "river", "desert", "meadow"]
    lines = []
    for _ in range(n):
        e, t, p = rng.choice(names), rng.choice(things), rng.choice(places)
        lines.append(rng.choice([
            f"The {e} eats {t}. The {e}'s home is the {p}.",
            f"Question: What does the {e} eat? Answer: The {e} eats {t}.",
            f"Every day the {e} looks for {t} near the {p}. It has {rng.randint(2, 99)} friends.",
        ]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def enc(corpus):
    return train_bpe(corpus, VOCAB)


def unicode_texts():
    rng = random.Random(1)
    random_bytes = bytes(rng.randrange(256) for _ in range(400)).decode("utf-8", errors="replace")
    return [
        "",
        " ",
        "héllo wörld — ça va? naïve café",
        "数据 科学 和 机器学习。日本語のテキスト、한국어",
        "emoji: 🙂👍🏽🇫🇷 👨‍👩‍👧 family",
        "combining: e\u0301 a\u0308 \u0915\u094d\u0937",
        "control:\x00\x01\t\r\n\x1b[31m\x7f end",
        "   leading and trailing spaces   \n\n\n",
        "<|endoftext|> <|user|> typed as plain text <|end|>",
        random_bytes,
        "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(300)),
    ]


# -----------------------------------------------------------------------------
# Training and encoding


def test_merge_replaces_the_pair_left_to_right():
    assert _merge([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert _merge([1, 1, 1], (1, 1), 9) == [9, 1]  # overlapping occurrences: the leftmost wins
    assert _merge([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    assert _merge([2, 1], (1, 2), 9) == [2, 1]  # the order within the pair matters
    assert _merge([1], (1, 2), 9) == [1] and _merge([], (1, 2), 9) == []


def test_vocabulary_layout(enc):
    assert enc.n_vocab == VOCAB
    for b in range(256):  # ids 0..255 are the raw bytes
        assert enc.decode_single_token_bytes(b) == bytes([b])
    assert [special_id(enc, t) for t in SPECIAL_TOKENS] == list(range(VOCAB - 4, VOCAB))
    with pytest.raises(ValueError, match="at least"):
        train_bpe("abc", 200)


def test_learns_frequent_words(enc, corpus):
    assert len(enc.encode_ordinary(" the")) == 1
    assert len(enc.encode_ordinary(" braitep")) < len(" braitep")
    n_bytes = len(corpus.encode("utf-8"))
    assert n_bytes / len(enc.encode_ordinary(corpus)) > 2.0  # bytes per token (1.0 without merges)


def test_round_trip_corpus(enc, corpus):
    assert enc.decode(enc.encode_ordinary(corpus)) == corpus
    line = corpus.splitlines()[5]
    assert enc.decode(enc.encode_ordinary(line)) == line


@pytest.mark.parametrize("text", unicode_texts())
def test_round_trip_unicode(enc, text):
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < VOCAB - len(SPECIAL_TOKENS) for i in ids)  # no special token from plain text
    assert enc.decode(ids) == text
    assert b"".join(enc.decode_tokens_bytes(ids)) == text.encode("utf-8")


def test_presplit_agrees_with_tiktoken(enc, corpus):
    """Training splits with the `regex` module; tiktoken splits in Rust. Same pieces, or the merges
    would be learned on words tiktoken never sees."""
    for text in [corpus[:2000]] + unicode_texts():
        pieces = regex.findall(GPT2_PATTERN, text)
        assert "".join(pieces) == text
        assert [i for p in pieces for i in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


def test_training_is_deterministic(enc, corpus, tmp_path):
    assert train_bpe(corpus, VOCAB)._mergeable_ranks == enc._mergeable_ranks
    # ... also in a fresh process with another string-hash seed
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tokenizer import train_bpe, save_tokenizer;"
            "save_tokenizer(train_bpe(open(sys.argv[2]).read(), int(sys.argv[3])), sys.argv[4])")
    (tmp_path / "corpus.txt").write_text(corpus)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "corpus.txt"), str(VOCAB),
                    str(tmp_path / "tok")], check=True, env=env, timeout=60)
    save_tokenizer(enc, tmp_path / "here")
    rank_file = "tokenizer.tiktoken"
    assert (tmp_path / "tok" / rank_file).read_bytes() == (tmp_path / "here" / rank_file).read_bytes()


# -----------------------------------------------------------------------------
# Save and load


def test_save_load_same_ids(enc, corpus, tmp_path):
    save_tokenizer(enc, tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json", "tokenizer.tiktoken"]  # no temp files left
    first = (tmp_path / "tok" / "tokenizer.tiktoken").read_text().splitlines()[:2]
    assert first == ["AA== 0", "AQ== 1"]  # tiktoken's format: base64(bytes) rank
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.n_vocab == enc.n_vocab and loaded.name == enc.name
    assert loaded._special_tokens == enc._special_tokens
    for text in [corpus] + unicode_texts():
        assert loaded.encode_ordinary(text) == enc.encode_ordinary(text)
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).n_vocab == enc.n_vocab  # a file in it works too


def test_malformed_files_name_file_and_line(enc, tmp_path):
    save_tokenizer(enc, tmp_path / "tok")
    ranks = tmp_path / "tok" / "tokenizer.tiktoken"
    lines = ranks.read_text().splitlines()
    for bad in ["not-base64!! 3", "AQ==", "AQ== x", "AQ== 1 2"]:
        ranks.write_text("\n".join(lines[:2] + [bad] + lines[3:]) + "\n")
        with pytest.raises(ValueError, match=r"tokenizer\.tiktoken:3:"):
            load_tokenizer(tmp_path / "tok")
    ranks.write_text("\n".join(lines[:-1]) + "\n")  # truncated: the last merge is missing
    with pytest.raises(ValueError, match=r"tokenizer\.json: special token ids"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text('{"name": "x",\n "pattern": }')
    with pytest.raises(ValueError, match=r"tokenizer\.json: line 2"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_gpt2_offline_or_clear_error():
    try:
        enc = load_tokenizer("gpt2")
    except FileNotFoundError as e:
        assert "offline" in str(e) and "python tokenizer.py" in str(e)
        pytest.skip("tiktoken's gpt2 files are not cached on this machine")
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert [special_id(enc, t) for t in SPECIAL_TOKENS] == [50256, 50257, 50258, 50259]
    assert enc.n_vocab == 50260


def test_gpt2_not_cached_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError, match="could not load tiktoken's 'gpt2' encoding offline"):
        load_tokenizer("gpt2")


# -----------------------------------------------------------------------------
# Special tokens and the chat template


def test_special_tokens(enc):
    end = special_id(enc, "<|end|>")
    assert enc.encode("<|end|>", allowed_special="all") == [end]
    assert enc.encode_ordinary("<|end|>") != [end]  # typed text stays text
    assert enc.decode([end]) == "<|end|>"
    with pytest.raises(KeyError, match="<|system|>"):
        special_id(enc, "<|system|>")


def test_chat_template(enc):
    user, assistant, end = (special_id(enc, t) for t in ["<|user|>", "<|assistant|>", "<|end|>"])
    eot = special_id(enc, "<|endoftext|>")
    prompt = encode_prompt(enc, "What does the kwex eat?")
    assert prompt[0] == user and prompt[-1] == assistant
    assert enc.decode(prompt[1:-1]) == "What does the kwex eat?"
    response = encode_response(enc, "The kwex eats fish.")
    assert response[-1] == end and enc.decode(response[:-1]) == "The kwex eats fish."
    assert encode_response(enc, "The kwex", end=False) == enc.encode_ordinary("The kwex")
    # generated tokens: cut at the first <|end|>, drop padding after it and any stray specials
    generated = response + enc.encode_ordinary(" more") + [end, eot, eot]
    assert decode_response(enc, generated) == "The kwex eats fish."
    assert decode_response(enc, torch.tensor(generated)) == "The kwex eats fish."
    assert decode_response(enc, enc.encode_ordinary("no end yet") + [eot]) == "no end yet"
    assert decode_response(enc, [end]) == ""
    assert decode_response(enc, encode_prompt(enc, "x <|end|> y")) == "x <|end|> y"  # typed, not special


# -----------------------------------------------------------------------------
# Command line


def test_cli(tmp_path, corpus):
    data = tmp_path / "pretrain.txt"
    data.write_text(corpus)
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *a], capture_output=True,
                                    text=True, cwd=tmp_path, timeout=60)
    r = run("--data", str(data), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    assert "vocab size: 320" in r.stdout and "bytes/token" in r.stdout
    assert load_tokenizer(tmp_path / "tok").encode_ordinary(corpus) == train_bpe(corpus, VOCAB).encode_ordinary(corpus)
    (tmp_path / "empty.txt").write_text("  \n")
    for path, what in [(tmp_path / "missing.txt", "not found"), (tmp_path / "empty.txt", "empty")]:
        r = run("--data", str(path), "--out", str(tmp_path / "bad"))
        assert r.returncode == 2
        assert r.stderr.strip().startswith(f"error: {path}") and what in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
