"""Byte-level BPE, trained on our own corpus and served as a tiktoken.Encoding.

A tokenizer turns text into integers the model can embed. Byte-level BPE (GPT-2's scheme) starts
from the 256 possible bytes, so any text round-trips exactly, then learns merges: it repeatedly
glues together the most frequent adjacent pair of tokens into a new token. Frequent words end up as
one token, rare ones stay spelled out in pieces. Before counting, the text is split into "words"
with GPT-2's regex (letters, numbers, punctuation and spaces apart), so no merge crosses a word.

Training is here, in plain Python; encoding is tiktoken's (Rust, fast). tiktoken only needs the
learned vocabulary: a dict `token bytes -> rank`, where the rank is the order in which the merge
was learned, and it encodes by applying the lowest-rank merge first, just as training did.

Four special tokens follow the learned ones. They never come out of ordinary text (a user typing
"<|end|>" gets plain characters), only from the chat template below:

    <|user|> prompt tokens <|assistant|> response tokens <|end|>

    python tokenizer.py --data data/pretrain.txt --vocab-size 1024 --out out/tokenizer

Simplified against real tokenizers: one split pattern, no byte-fallback tricks, no normalisation,
and training keeps every distinct word in memory (fine for a few MB of text, not for a web crawl).
"""

import argparse
import base64
import binascii
import hashlib
import heapq
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex  # installed with tiktoken (its own dependency); speaks the same \p{L} pattern syntax
import tiktoken

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
# GPT-2's split: contractions, words with their leading space, numbers, punctuation runs, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# -----------------------------------------------------------------------------
# Training


def _merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in the list `ids` by `new_id`, left to right."""
    # exercise bpe_merge: where ids[i], ids[i + 1] == pair put new_id and skip both, else keep ids[i]
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
    # end exercise


def train_bpe(text, vocab_size, name="tinyworld"):
    """Learn vocab_size - 256 - len(SPECIAL_TOKENS) merges on `text`; return a tiktoken.Encoding.

    Token ids: 0..255 are the raw bytes, then the merges in the order learned, then the special
    tokens. A corpus too small to supply that many merges gives a smaller vocabulary (check
    enc.n_vocab). Deterministic: ties between equally frequent pairs go to the smaller ids.
    """
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")

    # 1. Split into words with the same pattern tiktoken will use, and count each distinct word.
    # Special-token strings in the corpus (e.g. document separators) are cut out, not learned.
    counts = Counter()
    pattern = regex.compile(GPT2_PATTERN)
    for chunk in re.split("|".join(map(re.escape, SPECIAL_TOKENS)), text):
        counts.update(pattern.findall(chunk))
    words = [list(w.encode("utf-8")) for w in counts]  # each word as a list of token ids (bytes)
    freqs = list(counts.values())

    # 2. Count adjacent pairs once, remembering which words contain each pair.
    pair_counts = defaultdict(int)
    where = defaultdict(set)  # pair -> indices of the words it occurs in
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # A max-heap of (-count, pair). Counts change as we merge; instead of updating entries in
    # place we push the new count and skip stale entries when they surface.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    # 3. Merge the most frequent pair, then update only the words (and pairs) it touched.
    vocab = [bytes([b]) for b in range(256)]  # token id -> its bytes
    ranks = {b: i for i, b in enumerate(vocab)}  # token bytes -> id (tiktoken's "mergeable ranks")
    while len(vocab) < 256 + n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if neg_count == 0 or pair_counts.get(pair, 0) != -neg_count:
            continue  # stale heap entry: this pair's count has changed since it was pushed
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        if new_bytes in ranks:
            continue  # rare: another pair already built these bytes; tiktoken needs unique tokens
        new_id = len(vocab)
        vocab.append(new_bytes)
        ranks[new_bytes] = new_id
        delta = defaultdict(int)  # change in each pair's count from this merge
        for i in where.pop(pair):
            w = words[i]
            new_w = _merge(w, pair, new_id)
            if len(new_w) == len(w):
                continue  # stale index: an earlier merge already removed the pair from this word
            for p in zip(w, w[1:]):
                delta[p] -= freqs[i]
            for p in zip(new_w, new_w[1:]):
                delta[p] += freqs[i]
                where[p].add(i)
            words[i] = new_w
        for p, d in delta.items():
            if d != 0:
                pair_counts[p] += d
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))

    special = {tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


# -----------------------------------------------------------------------------
# Save and load: tiktoken's rank file + a small JSON with the rest
# (This file keeps its own small atomic write and error exit instead of common.py's, so it loads
# without torch: the tokenizer CLI starts in a fraction of a second.)


def _atomic_write_text(path, text):
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_tokenizer(enc, out_dir):
    """Write out_dir/tokenizer.tiktoken (base64(bytes) rank per line) and out_dir/tokenizer.json."""
    out_dir = Path(out_dir)
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    lines = "".join(f"{base64.b64encode(b).decode('ascii')} {rank}\n" for b, rank in ranks)
    meta = {
        "name": enc.name,
        "pattern": enc._pat_str,
        "special_tokens": dict(sorted(enc._special_tokens.items(), key=lambda kv: kv[1])),
        "vocab_size": enc.n_vocab,
    }
    # Each file is written atomically; the JSON goes last, so a folder with it is complete.
    _atomic_write_text(out_dir / "tokenizer.tiktoken", lines)
    _atomic_write_text(out_dir / "tokenizer.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def _read_ranks(path):
    """Parse a tiktoken rank file; any bad line raises ValueError naming the file and the line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError(f"expected 'base64 rank', got {len(parts)} fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}:{lineno}: not a valid rank line ({e})") from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty rank file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each exactly once")
    return ranks


def load_tokenizer(path):
    """A tokenizer folder written by save_tokenizer, or "gpt2" (tiktoken's, with our chat tokens)."""
    if str(path) == "gpt2":
        return _load_gpt2()
    folder = Path(path)
    if folder.is_file():  # also accept the path of one of the two files
        folder = folder.parent
    rank_file, meta_file = folder / "tokenizer.tiktoken", folder / "tokenizer.json"
    for f in (meta_file, rank_file):
        if not f.exists():
            raise FileNotFoundError(f"{f}: not found (train a tokenizer with: python tokenizer.py --out {folder})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("special_tokens"), dict):
        raise ValueError(f"{meta_file}: expected an object with a 'special_tokens' object")
    missing = [k for k in ("name", "pattern", "vocab_size") if k not in meta]
    if missing:
        raise ValueError(f"{meta_file}: missing field(s) {', '.join(missing)}")
    ranks = _read_ranks(rank_file)
    special = {tok: int(i) for tok, i in meta["special_tokens"].items()}
    if sorted(special.values()) != list(range(len(ranks), len(ranks) + len(special))):
        raise ValueError(f"{meta_file}: special token ids {sorted(special.values())} should follow the "
                         f"{len(ranks)} tokens of {rank_file.name} ({len(ranks)}..{len(ranks) + len(special) - 1})")
    enc = tiktoken.Encoding(name=meta["name"], pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=special)
    if enc.n_vocab != meta["vocab_size"]:
        raise ValueError(f"{meta_file}: vocab_size {meta['vocab_size']} does not match {rank_file} "
                         f"({len(ranks)} tokens + {len(special)} special = {enc.n_vocab})")
    return enc


# tiktoken downloads these on first use and caches them under sha1(url); we never go online.
_GPT2_FILES = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
               "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]


def _tiktoken_cache_dir():
    # The same lookup as tiktoken.load.read_file_cached.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _load_gpt2():
    """tiktoken's GPT-2 encoding plus our chat tokens, from tiktoken's cache only (no download)."""
    cache = _tiktoken_cache_dir()
    cached = cache != "" and all(
        os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())) for url in _GPT2_FILES)
    if not cached:
        raise FileNotFoundError(
            f"could not load tiktoken's 'gpt2' encoding offline: its files are not in tiktoken's cache "
            f"({cache or 'caching disabled'}). Run tiktoken.get_encoding('gpt2') once on a machine with "
            f"internet and copy the cache folder (or set TIKTOKEN_CACHE_DIR), or use the built-in tokenizer: "
            f"python tokenizer.py --data data/pretrain.txt --out out/tokenizer, then pass out/tokenizer")
    base = tiktoken.get_encoding("gpt2")
    # <|endoftext|> keeps GPT-2's id 50256; the chat tokens follow it (50257..50259).
    special = {tok: 50256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="gpt2-chat", pat_str=base._pat_str,
                             mergeable_ranks=base._mergeable_ranks, special_tokens=special)


# -----------------------------------------------------------------------------
# The chat template: the one place every stage turns prompts and responses into tokens


def special_id(enc, name):
    """Id of a special token, e.g. special_id(enc, "<|end|>")."""
    if name not in enc._special_tokens:
        raise KeyError(f"{name!r} is not a special token of tokenizer '{enc.name}' "
                       f"(it has {sorted(enc._special_tokens)})")
    return enc._special_tokens[name]


def encode_prompt(enc, prompt):
    """<|user|> prompt <|assistant|>: the model continues from here with its response."""
    return [special_id(enc, "<|user|>")] + enc.encode_ordinary(prompt) + [special_id(enc, "<|assistant|>")]


def encode_response(enc, response, end=True):
    """response <|end|>: the response tokens, closed by the end token unless end=False."""
    return enc.encode_ordinary(response) + ([special_id(enc, "<|end|>")] if end else [])


def decode_response(enc, ids):
    """Text of generated response tokens: cut at the first <|end|>, other special tokens dropped."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    end = special_id(enc, "<|end|>")
    if end in ids:
        ids = ids[: ids.index(end)]
    specials = set(enc._special_tokens.values())  # <|endoftext|> used as padding, stray chat tokens
    # ids past the tokenizer's vocabulary can come from a model whose vocab was rounded up: dropped too
    return enc.decode([i for i in ids if i not in specials and 0 <= i < enc.n_vocab])


# -----------------------------------------------------------------------------
# Command line: train on a text file, save, report

def die(message):
    """Stop with one clear line on stderr and exit status 2 (bad input, not a crash)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer on a text file.")
    parser.add_argument("--data", default="data/pretrain.txt", help="plain-text training corpus")
    parser.add_argument("--vocab-size", type=int, default=1024, help="total tokens: 256 bytes + merges + 4 special")
    parser.add_argument("--out", default="out/tokenizer", help="folder for tokenizer.tiktoken and tokenizer.json")
    parser.add_argument("--name", default="tinyworld", help="name stored with the tokenizer")
    args = parser.parse_args()

    data = Path(args.data)
    if not data.is_file():
        die(f"{data}: file not found (write the tiny world's data with: python world.py)")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        die(f"{data}: not UTF-8 text (byte {e.start})")
    if not text.strip():
        die(f"{data}: empty file")
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        die(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)}, got {args.vocab_size}")

    t0 = time.time()
    enc = train_bpe(text, args.vocab_size, name=args.name)
    train_s = time.time() - t0
    save_tokenizer(enc, args.out)

    n_tokens = len(enc.encode_ordinary(text))
    n_bytes = len(text.encode("utf-8"))
    print(f"trained on {data} ({n_bytes / 1e3:.0f} kB) in {train_s:.1f}s")
    print(f"vocab size: {enc.n_vocab} (256 bytes + {enc.n_vocab - 256 - len(SPECIAL_TOKENS)} merges "
          f"+ {len(SPECIAL_TOKENS)} special)" + ("" if enc.n_vocab == args.vocab_size
                                                  else f"; the corpus ran out of pairs before {args.vocab_size}"))
    print(f"compression: {n_bytes / n_tokens:.2f} bytes/token ({n_tokens:,} tokens)")
    sample = text.strip().splitlines()[0][:80]
    ids = enc.encode_ordinary(sample)
    print(f"sample: {sample!r}")
    print(f"  -> {len(ids)} tokens: {ids}")
    print(f"  -> pieces: {[enc.decode([i]) for i in ids]}")
    print(f"saved to {args.out}/tokenizer.tiktoken and tokenizer.json")
