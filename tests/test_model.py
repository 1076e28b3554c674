"""model.py against references: a hand-written attention, generation without the cache, the same
prompt without padding, and a GPT-2-layout state dict exported from a known model."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, GPTConfig, ScalarModel, attention_bias, last_token_index, left_pad, sample_next_token  # noqa: E402

PAD = 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine, two threads wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0, **kw):
    """A small float64 GPT with larger-than-GPT-2 weights, so its predictions are sharp and
    differ from context to context (a freshly initialised GPT-2 is nearly uniform)."""
    cfg = dict(block_size=48, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def random_prompts(lengths, vocab_size=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


# -----------------------------------------------------------------------------
# Padding, masks, positions


def test_left_pad_and_last_token_index():
    idx, mask = left_pad([[5, 6, 7], [8], []], pad_id=PAD)
    assert idx.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    m = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(m).tolist() == [2, 0, 3, 3]


def test_attention_bias():
    """Causal, keys restricted to real tokens, and every query (pads too) sees at least itself."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    allowed = attention_bias(mask, T=4)[:, 0]  # (B, T, S)
    assert allowed[1].tolist() == torch.ones(4, 4).tril().bool().tolist()
    assert allowed[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    # the last query only, against all 4 keys (one decoding step with a KV cache)
    assert attention_bias(mask, T=1)[:, 0, 0].tolist() == [[False, False, True, True], [True] * 4]


def test_logits_match_reference_attention():
    """A one-layer GPT written out by hand: embeddings, LayerNorm, softmax attention with a causal
    mask, tanh-GELU MLP, tied output matrix."""
    model = make_model(n_layer=1, n_head=2)
    idx = torch.tensor(random_prompts([9, 9], seed=3))
    B, T = idx.shape
    C, nh = model.config.n_embd, model.config.n_head
    hs = C // nh
    tr, blk = model.transformer, model.transformer.h[0]

    def ln(x, m):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * m.weight + m.bias

    x = tr.wte.weight[idx] + tr.wpe.weight[torch.arange(T)]
    h = ln(x, blk.ln_1)
    qkv = h @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # key after query
    heads = []
    for head in range(nh):
        sl = slice(head * hs, (head + 1) * hs)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hs)  # (B, T, T)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        heads.append(weights @ v[..., sl])  # (B, T, hs)
    out = torch.cat(heads, dim=-1)  # (B, T, C)
    x = x + out @ blk.attn.c_proj.weight.T + blk.attn.c_proj.bias
    h = ln(x, blk.ln_2) @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    x = x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    expected = ln(x, tr.ln_f) @ tr.wte.weight.T

    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected)  # the is_causal path
        torch.testing.assert_close(model(idx, torch.ones_like(idx)), expected)  # the boolean-mask path


def test_left_padding_changes_nothing():
    model = make_model()
    prompts = random_prompts([5, 11, 2, 8])
    idx, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        batch_logits = model(idx, mask)
        assert torch.isfinite(batch_logits).all()  # pad query rows too
        batch_out = model.generate(idx, mask, max_new_tokens=10, temperature=0)
        for b, p in enumerate(prompts):
            alone = torch.tensor([p])
            torch.testing.assert_close(batch_logits[b, -len(p):], model(alone)[0])
            alone_out = model.generate(alone, torch.ones_like(alone), max_new_tokens=10, temperature=0)
            assert batch_out[b].tolist() == alone_out[0].tolist()


# -----------------------------------------------------------------------------
# Generation


def test_cached_generation_equals_uncached():
    model = make_model()
    idx, mask = left_pad(random_prompts([3, 7, 1, 12, 6]), PAD)
    cached = model.generate(idx, mask, max_new_tokens=20, temperature=0)
    uncached = model.generate(idx, mask, max_new_tokens=20, temperature=0, use_cache=False)
    assert cached.shape == (5, 20)
    assert cached.tolist() == uncached.tolist()
    assert len(set(cached.flatten().tolist())) > 3  # the model is not stuck on one token
    # sampling too: same generator seed, same tokens
    kw = dict(max_new_tokens=20, temperature=0.8, top_k=20, top_p=0.9)
    a = model.generate(idx, mask, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(idx, mask, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert a.tolist() == b.tolist()


def test_finished_rows_leave_the_batch_and_change_no_token():
    """generate drops finished rows from its batch (and draws torch.multinomial's noise itself, for the
    whole batch), and prefills a repeated prompt once: its tokens must be those of a plain loop that
    runs every row to the end with torch.multinomial and no cache."""
    model = make_model(vocab_size=12)  # a small vocabulary: some rows end early, others late
    prompts = random_prompts([3, 7, 1, 12, 6, 2, 9, 5], vocab_size=12)
    idx, mask = left_pad(prompts + prompts[:3] + prompts[:1], PAD)  # repeats, as best-of-n samples them
    eos, pad, n = 3, PAD, 30

    def reference(seed):
        g, x, m = torch.Generator().manual_seed(seed), idx.clone(), mask.clone()
        finished, out = torch.zeros(len(x), dtype=torch.bool), []
        for _ in range(n):
            probs = F.softmax(model(x, m)[:, -1, :].float() / 0.9, dim=-1)
            t = torch.multinomial(probs, 1, generator=g).squeeze(-1)
            t = torch.where(finished, torch.full_like(t, pad), t)
            finished |= t == eos
            out.append(t)
            if finished.all():
                break
            x, m = torch.cat([x, t[:, None]], 1), torch.cat([m, torch.ones_like(t)[:, None]], 1)
        return torch.stack(out, 1).tolist()

    dropped = 0
    for seed in range(5):
        expected = reference(seed)
        lengths = [row.index(eos) + 1 if eos in row else len(row) for row in expected]
        dropped += sorted(lengths)[1] < max(lengths)  # two rows finished while another still ran: a compaction
        out = model.generate(idx, mask, n, temperature=0.9, eos_id=eos, pad_id=pad,
                             generator=torch.Generator().manual_seed(seed))
        assert out.tolist() == expected
    assert dropped >= 3


def test_sampling_is_reproducible_and_varies():
    model = make_model()
    idx, mask = left_pad(random_prompts([4, 6]), PAD)
    a = model.generate(idx, mask, 16, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, mask, 16, generator=torch.Generator().manual_seed(1))
    c = model.generate(idx, mask, 16, generator=torch.Generator().manual_seed(2))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = make_model()
    idx, mask = left_pad(random_prompts([4, 9, 2]), PAD)
    greedy = model.generate(idx, mask, 12, temperature=0)
    top_k = model.generate(idx, mask, 12, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    top_p = model.generate(idx, mask, 12, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert top_k.tolist() == greedy.tolist()
    assert top_p.tolist() == greedy.tolist()


def test_eos_then_pad_and_early_stop():
    model = make_model()
    idx, mask = left_pad(random_prompts([4, 9, 2]), PAD)
    free = model.generate(idx, mask, 16, temperature=0).tolist()

    def ends(eos):  # each row finishes at its first eos (inclusive)
        return [row.index(eos) + 1 if eos in row else len(row) for row in free]

    # an eos that row 0 emits early and some other row emits late (or never), so row 0 shows pads
    eos = max(sorted(set(free[0][1:8])), key=lambda t: max(ends(t)) - ends(t)[0])
    end0, R = ends(eos)[0], max(ends(eos))  # generation stops as soon as every row has finished
    assert end0 < R
    pad = min(set(range(97)) - {t for row in free for t in row})  # a pad id we can tell apart
    out = model.generate(idx, mask, 16, temperature=0, eos_id=eos, pad_id=pad).tolist()
    expected = [row[:end] + [pad] * (R - end) for row, end in zip(free, ends(eos))]
    assert out == [row[:R] for row in expected]
    assert out[0][end0 - 1] == eos and out[0][end0:] == [pad] * (R - end0)


def test_generate_rejects_too_long():
    model = make_model(block_size=16)
    idx = torch.ones(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(idx, torch.ones_like(idx), max_new_tokens=7)
    assert model.generate(idx, torch.ones_like(idx), max_new_tokens=6).shape == (2, 6)  # exactly fits


# -----------------------------------------------------------------------------
# GPT-2 layout


def to_hf_gpt2(model, prefix=True):
    """Export like Hugging Face's GPT2LMHeadModel: Conv1D weights [in, out], mask buffers."""
    T = model.config.block_size
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t().contiguous()
        if k.startswith("transformer.") and not prefix:
            k = k.removeprefix("transformer.")
        sd[k] = v.clone()
    for i in range(model.config.n_layer):
        p = "transformer." if prefix else ""
        sd[f"{p}h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[f"{p}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


@pytest.mark.parametrize("prefix", [True, False])
def test_from_gpt2_layout(prefix):
    ref = make_model(n_head=1, n_embd=64).float().double()  # fp32-exact, as the loaded model is fp32
    # (GPT-2's head size is 64, so n_head can be inferred)
    sd = to_hf_gpt2(ref, prefix)
    assert sd["transformer.h.0.attn.c_attn.weight" if prefix else "h.0.attn.c_attn.weight"].shape == (64, 192)
    loaded = GPT.from_gpt2(sd).double().eval()
    assert loaded.config == ref.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    idx, mask = left_pad(random_prompts([6, 3]), PAD)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, mask), ref(idx, mask))


def test_from_gpt2_extends_vocab():
    """A GPT-2 checkpoint plus 3 chat tokens: old rows copied, new rows freshly initialised."""
    ref = make_model(n_head=2, n_embd=64).float().double()
    config = GPTConfig(**{**ref.config.__dict__, "vocab_size": ref.config.vocab_size + 3})
    loaded = GPT.from_gpt2(to_hf_gpt2(ref), config).double().eval()
    V = ref.config.vocab_size
    assert loaded.transformer.wte.weight.shape[0] == V + 3
    idx = torch.tensor(random_prompts([7]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[..., :V], ref(idx))


def test_from_gpt2_rejects_wrong_keys():
    sd = to_hf_gpt2(make_model(n_head=1, n_embd=64))
    del sd["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match="c_fc"):
        GPT.from_gpt2(sd)


# -----------------------------------------------------------------------------
# Scalar heads


def test_score_reads_last_real_token():
    gpt = make_model()
    rm = ScalarModel.from_gpt(gpt).double().eval()
    for p_rm, p_gpt in zip(rm.transformer.parameters(), gpt.parameters()):
        assert torch.equal(p_rm, p_gpt)
    seqs = random_prompts([5, 9, 1, 7])
    T = 12
    left = torch.zeros(4, T, dtype=torch.long)
    right, both = left.clone(), left.clone()
    for b, s in enumerate(seqs):  # the same sequences padded left, right, and on both sides
        n = len(s)
        left[b, T - n:] = 1
        right[b, :n] = 1
        both[b, 2:2 + n] = 1
    scores = []
    with torch.no_grad():
        for mask in (left, right, both):
            idx = torch.full_like(mask, PAD)
            for b, s in enumerate(seqs):
                idx[b, mask[b].bool()] = torch.tensor(s)
            values = rm(idx, mask)  # (B, T)
            last = [int(mask[b].nonzero().max()) for b in range(4)]
            score = rm.score(idx, mask)
            torch.testing.assert_close(score, values[torch.arange(4), torch.tensor(last)])
            scores.append(score)
        # and it is the score of each sequence alone, so padding did not leak into it
        alone = torch.stack([rm.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    for score in scores:
        torch.testing.assert_close(score, alone)
    assert len(set(alone.tolist())) == 4


def test_gpt_state_dict_loads_into_scalar_model():
    gpt = make_model()
    rm = ScalarModel(gpt.config).double()
    rm.transformer.load_state_dict(gpt.state_dict())
    idx = torch.tensor(random_prompts([6]))
    with torch.no_grad():
        h = gpt.hidden_states(idx)
        torch.testing.assert_close(rm(idx, torch.ones_like(idx)), (h @ rm.head.weight.T + rm.head.bias).squeeze(-1))


def test_init_and_num_params():
    model = GPT(GPTConfig())
    C, V, L, T = 128, 1024, 4, 128
    per_layer = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + T * C + L * per_layer + 2 * C  # lm_head tied: counted once
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * L)) < 0.001
    assert torch.isfinite(F.cross_entropy(model(torch.zeros(2, 5, dtype=torch.long)).view(-1, V),
                                          torch.zeros(10, dtype=torch.long)))


def test_sampling_noise_is_torch_multinomials_bit_for_bit():
    """sample_next_token draws its Exp(1) noise itself on the CPU (-log(1 - u), u uniform in double precision,
    faster than exponential_): the tokens must be torch.multinomial's, and the generator must end where
    torch.multinomial leaves it (the next batch's tokens depend on it), also for a subset of the rows."""
    logits = torch.randn(64, 841, generator=torch.Generator().manual_seed(0)) * 3
    for seed in range(3):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(4):
            got = sample_next_token(logits, 0.7, generator=ours)
            want = torch.multinomial(F.softmax(logits / 0.7, dim=-1), 1, generator=theirs).squeeze(-1)
            assert got.tolist() == want.tolist()
        assert torch.equal(ours.get_state(), theirs.get_state())
        rows = torch.tensor([3, 10, 40])  # rows still running in a batch of 64: the noise of all 64 is drawn
        got = sample_next_token(logits[rows], 0.7, generator=ours, rows=rows, n_rows=64)
        want = torch.multinomial(F.softmax(logits / 0.7, dim=-1), 1, generator=theirs).squeeze(-1)[rows]
        assert got.tolist() == want.tolist() and torch.equal(ours.get_state(), theirs.get_state())
