"""The GPT: GPT-2's architecture and parameter names, batched generation with a KV cache, and the
scalar-head models (reward model, value model) built on the same trunk.

Layout as in GPT-2 (and nanoGPT), so a GPT-2 checkpoint loads with GPT.from_gpt2(state_dict):

    transformer.wte, transformer.wpe      token and position embeddings
    transformer.h.N.ln_1, .attn.c_attn, .attn.c_proj, .ln_2, .mlp.c_fc, .mlp.c_proj
    transformer.ln_f, lm_head             (lm_head shares its weight with wte)

What RLHF needs beyond nanoGPT is batches of prompts of different lengths. They are LEFT-padded,
so every row's next token is at the last column:

    idx             [pad pad  a   b   c ]      attention_mask [0 0 1 1 1]
                    [ d   e   f   g   h ]                     [1 1 1 1 1]

Padding must change nothing: pads are masked out as keys, and position ids count real tokens only
(cumsum(mask) - 1), so "a b c" gets positions 0 1 2 whether padded or not.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128  # longest sequence (prompt + response) the model sees
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2


# -----------------------------------------------------------------------------
# Masks, positions, padding


def position_ids_from_mask(attention_mask):
    """(B, S) 0/1 mask -> (B, S) positions counting real tokens only: 0 for leading pads."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def attention_bias(attention_mask, T):
    """Boolean (B, 1, T, S) mask for the last T of S positions: True where a query may look.

    A query sees earlier-or-same positions (causal) that are real tokens (key mask). It also always
    sees itself: a pad query would otherwise have nothing to attend to, and a softmax over nothing
    is NaN in some attention kernels. Pad rows compute garbage that nobody reads, but finite garbage.
    """
    B, S = attention_mask.shape
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1) absolute positions
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) & attention_mask.bool()[:, None, :]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)
    return allowed[:, None, :, :]  # (B, 1, T, S), broadcast over heads


def last_token_index(attention_mask):
    """(B,) index of the last real token of each row, for left, right or both-sided padding."""
    T = attention_mask.size(1)
    positions = torch.arange(T, device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)  # an all-pad row gives 0


def left_pad(seqs, pad_id, device=None):
    """list of token lists -> (idx, attention_mask), both (B, T) LongTensors, padded on the left."""
    T = max((len(s) for s in seqs), default=0)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s) > 0:
            idx[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
            attention_mask[b, T - len(s):] = 1
    return idx.to(device), attention_mask.to(device)


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to max_len.

    With the cache, each generation step runs the model on ONE new token per row: its query attends
    to the stored keys/values instead of recomputing the whole sequence.
    """

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None  # (n_layer, B, nh, max_len, hs), allocated at the first update
        self.pos = 0  # number of positions already stored

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) after the cached ones; return all of them (B, nh, pos+T, hs)."""
        B, nh, T, hs = k.shape
        if self.k is None:  # allocate on first use, in the dtype attention runs in (e.g. bf16 autocast);
            # left unfilled: a position is always written before it is read
            self.k = k.new_empty(self.n_layer, B, nh, self.max_len, hs)
            self.v = torch.empty_like(self.k)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


# -----------------------------------------------------------------------------
# The transformer


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, mask=None, kv_cache=None, layer=0):
        B, T, C = x.size()
        # exercise causal_attention: heads (B, nh, T, hs); k, v through kv_cache; causal softmax(q k^T / sqrt(hs)) v; y (B, T, C)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:  # no padding, no cache: plain causal attention (the fastest kernel)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        # end exercise
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer)  # pre-norm residual, as in GPT-2
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix reads and writes tokens

        # GPT-2 init: N(0, 0.02), and the projections into the residual stream scaled down by
        # 1/sqrt(2 * n_layer), since 2 of them per layer add up along the residual path.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters, counting the tied embedding/lm_head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, attention_mask=None, position_ids=None, kv_cache=None):
        """(B, T) token ids -> (B, T, C) final hidden states (after ln_f).

        attention_mask covers all positions the queries may see: (B, T), or (B, cached + T) with a
        kv_cache. Without mask or cache this is plain causal attention over unpadded rows.
        """
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} is longer than block_size {self.config.block_size}")
        if attention_mask is None and kv_cache is not None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=idx.device).expand(B, T)
            else:
                position_ids = position_ids_from_mask(attention_mask)[:, -T:]  # (B, T)
        mask = attention_bias(attention_mask, T) if attention_mask is not None else None  # (B, 1, T, S)

        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, attention_mask=None, position_ids=None, kv_cache=None):
        """(B, T) token ids -> (B, T, vocab_size) logits for the next token at every position."""
        return self.lm_head(self.hidden_states(idx, attention_mask, position_ids, kv_cache))

    # -------------------------------------------------------------------------
    # Loading GPT-2 checkpoints

    @classmethod
    def from_gpt2(cls, state_dict, config=None):
        """A GPT from a state dict in the usual (Hugging Face) GPT-2 layout.

        GPT-2 stores its linear layers as Conv1D, weight [in, out]: we transpose them to nn.Linear's
        [out, in]. Keys may or may not start with "transformer."; the causal-mask buffers
        (.attn.bias, .attn.masked_bias) are not weights and are ignored. Without a config, sizes
        come from the shapes; the number of heads cannot, so it is n_embd // 64 (GPT-2's head size).
        A config with a larger vocab_size keeps fresh rows for the extra tokens (e.g. chat tokens),
        one with a smaller block_size keeps the first position embeddings.
        """
        sd = {}
        for k, v in state_dict.items():
            k = k.removeprefix("transformer.")
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue  # mask buffers; lm_head is tied to wte
            if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                v = v.t()  # Conv1D [in, out] -> Linear [out, in]
            sd["transformer." + k] = v
        if "transformer.wte.weight" not in sd:
            raise ValueError("not a GPT-2 state dict: no wte.weight (keys look like: "
                             f"{', '.join(list(state_dict)[:4])}, ...)")
        vocab_size, n_embd = sd["transformer.wte.weight"].shape
        if config is None:
            layers = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")}
            config = GPTConfig(block_size=sd["transformer.wpe.weight"].shape[0], vocab_size=vocab_size,
                               n_layer=len(layers), n_head=max(1, n_embd // 64), n_embd=n_embd,
                               bias="transformer.h.0.attn.c_attn.bias" in sd)
        model = cls(config)
        own = model.state_dict()
        own.pop("lm_head.weight")  # the same tensor as wte
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"GPT-2 state dict does not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name in ("transformer.wte.weight", "transformer.wpe.weight"):
            src, dst = sd[name], own[name]
            if src.shape[1] == dst.shape[1] and src.shape[0] != dst.shape[0]:
                n = min(src.shape[0], dst.shape[0])  # extend the vocabulary / crop the positions
                sd[name] = torch.cat([src[:n], dst[n:].to(src.dtype)])
        model.load_state_dict(sd, strict=False)  # strict=False only for the tied lm_head.weight
        return model

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens=32, temperature=1.0, top_k=None, top_p=None,
                 eos_id=None, pad_id=0, generator=None, use_cache=True):
        """Continue a batch of LEFT-padded prompts; return only the new tokens, (B, R), R <= max_new_tokens.

        idx (B, T) prompts, attention_mask (B, T) with 1 on real tokens. Once a row emits eos_id it
        is finished: the eos is kept and its later tokens are pad_id; generation stops early when
        every row has finished. use_cache=False recomputes the whole sequence at every step (slow;
        kept to check the cache against).

        Finished rows leave the batch (with their keys and values) once they are a quarter of it: most
        answers end long before the longest, and the model's work is per row. The random numbers are
        still drawn for all B rows (sample_next_token's rows), so the tokens are exactly those of the
        whole batch run to the end.
        """
        B, T = idx.size()
        if max_new_tokens < 1:
            return idx.new_zeros((B, 0))
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                             f"block_size {self.config.block_size}")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        attention_mask = attention_mask.long()
        kv_cache = KVCache(self.config.n_layer, T + max_new_tokens) if use_cache else None
        # Prefill: (B, V) logits at the last column. Rows with the same prompt (best-of-n, a group of answers)
        # share its keys and values: computed once and copied (a row's numbers depend on that row alone).
        unique, inverse = torch.unique(torch.cat([idx, attention_mask], dim=1), dim=0, return_inverse=True)
        if use_cache and len(unique) < B:
            logits = self.lm_head(self.hidden_states(unique[:, :T], unique[:, T:], kv_cache=kv_cache)[:, -1])[inverse]
            kv_cache.k, kv_cache.v = kv_cache.k[:, inverse], kv_cache.v[:, inverse]
        else:
            logits = self.lm_head(self.hidden_states(idx, attention_mask, kv_cache=kv_cache)[:, -1])

        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        rows = torch.arange(B, device=idx.device)  # the rows still in the batch (logits, mask, cache)
        new_tokens = []
        for step in range(max_new_tokens):
            next_id = torch.full((B,), pad_id, dtype=torch.long, device=idx.device)
            next_id[rows] = sample_next_token(logits, temperature, top_k, top_p, generator, rows, B)
            if eos_id is not None:
                next_id = torch.where(finished, torch.full_like(next_id, pad_id), next_id)
                finished |= next_id == eos_id
            new_tokens.append(next_id)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            done = finished[rows]  # (b,) the rows of the batch that have finished
            if use_cache and int(done.sum()) * 4 >= len(rows):  # a quarter finished: they leave the batch
                keep = (~done).nonzero().squeeze(1)
                rows, attention_mask = rows[keep], attention_mask[keep]
                kv_cache.k, kv_cache.v = kv_cache.k[:, keep], kv_cache.v[:, keep]
            # Feed the sampled token back. Tokens after eos stay "real" in the mask: they are never
            # read, and keeping them keeps every row's positions simple.
            attention_mask = torch.cat([attention_mask, torch.ones_like(rows)[:, None]], dim=1)
            if use_cache:
                logits = self(next_id[rows, None], attention_mask, kv_cache=kv_cache)[:, -1, :]  # (b, V)
            else:
                idx = torch.cat([idx, next_id[:, None]], dim=1)  # (B, T + step + 1)
                logits = self(idx, attention_mask)[:, -1, :]
        return torch.stack(new_tokens, dim=1)  # (B, R)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, rows=None, n_rows=None):
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy (argmax).

    rows, n_rows: the logits are those of these rows of a batch of n_rows (generate drops finished
    rows): the random numbers of all n_rows are drawn and these rows' used, so every row gets the token
    it would get in the whole batch."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the most likely tokens until their probability adds up to top_p.
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = mass_before >= top_p
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    # torch.multinomial(probs, 1) as torch computes it (the exponential race: argmax_v p_v / q_v, q_v ~ Exp(1)),
    # written out so that the noise can be drawn for the whole batch
    if rows is None:
        rows, n_rows = slice(None), probs.size(0)
    if probs.device.type == "cpu":
        # The same numbers as torch's exponential_ on the CPU, bit for bit (-log(1 - u), u uniform in double
        # precision; tests/test_model.py checks it), but twice as fast, and the log only for the rows still running
        u = torch.rand(n_rows, probs.size(1), dtype=torch.float64, generator=generator, device=probs.device)[rows]
        q = u.neg_().log1p_().neg_().float()
    else:
        q = probs.new_empty(n_rows, probs.size(1)).exponential_(1, generator=generator)[rows]
    return (probs / q).argmax(dim=-1)


# -----------------------------------------------------------------------------
# Scalar heads: the reward model and the value model


class ScalarModel(nn.Module):
    """A GPT trunk and a linear head giving one number per position (the lm_head is unused).

    The reward model reads it at the last real token of prompt + response (score); PPO's value
    model reads it at every response position (forward).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = GPT(config)  # kept whole, so a GPT state dict loads into .transformer
        self.head = nn.Linear(config.n_embd, 1)
        # Small head, as in OpenAI's lm-human-preferences: std 1/sqrt(C + 1), zero bias.
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt):
        """A scalar model whose trunk starts as a copy of `gpt` (e.g. the SFT model)."""
        p = next(gpt.parameters())
        model = cls(gpt.config).to(device=p.device, dtype=p.dtype)
        model.transformer.load_state_dict(gpt.state_dict())
        return model

    def forward(self, idx, attention_mask):
        """(B, T) tokens, mask -> (B, T) value at every position."""
        h = self.transformer.hidden_states(idx, attention_mask)  # (B, T, C)
        return self.head(h).squeeze(-1)  # (B, T)

    def score(self, idx, attention_mask):
        """(B,) value at each row's last real token, wherever the padding is."""
        values = self(idx, attention_mask)  # (B, T)
        rows = torch.arange(idx.size(0), device=idx.device)
        return values[rows, last_token_index(attention_mask)]
