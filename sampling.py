"""Answers from a policy, and their log-probs at the temperature that sampled them.

Every RL stage does two things with a language model besides training it: it samples answers to
prompts (feedback.py, ppo.py, evaluate.py, ...), and it scores the log-probability of given answer
tokens (PPO's ratio and KL penalty, DPO's loss, the KL to SFT of every evaluation). Both live here,
side by side, because they must agree: the temperature that sampled a token is the one its
log-prob is scored at, or PPO's first ratio is not 1 and the KL is measured against a distribution
nobody sampled from.

    sample_responses   prompts (strings) -> answers {"ids", "text", "ended"}, batched with the KV cache
    collate_responses  prompt + answer token lists -> one left-padded batch with its answer mask
    response_logprobs  model + batch -> log pi(y_t | x, y_<t) and the entropy of each answer token
    token_logprobs     the math under it: log-prob of the target and entropy, from the logits

    log pi(y_t | ...) = z[y_t] - logsumexp(z),   H_t = -sum_v p_v log p_v,   z = logits / temperature

token_logprobs is plain PyTorch (log_softmax, then gather); on CUDA tensors it runs the fused Triton
kernel instead (kernels/logprobs.py: one pass over the logits, no [N, V] log-probs in memory), which
tests/test_kernels.py checks against this function and against float64.
"""

from pathlib import Path

import torch

import common
import kernels
from model import left_pad
from tokenizer import decode_response, encode_prompt, special_id


def encode_prompts(enc, prompts, max_len, where="prompts"):
    """Chat-template token ids of each prompt; a prompt longer than max_len stops with a clear line."""
    out = []
    for i, p in enumerate(prompts):
        ids = encode_prompt(enc, p)
        if len(ids) > max_len:
            # where: the JSONL file the prompts were read from (one per non-blank line), so name the line
            at = (f"{where}:{common.jsonl_line_numbers(where)[i]}" if Path(where).is_file()
                  else f"{where}: prompt {i + 1}")
            common.die(f"{at}: the prompt is {len(ids)} tokens, longer than the {max_len} the context leaves for it")
        out.append(ids)
    return out


@torch.no_grad()
def sample_responses(model, enc, prompts, device, max_new_tokens=48, temperature=1.0, top_k=None, top_p=None,
                     batch_size=128, generator=None):
    """Answers to a list of prompt strings, in batches with the KV cache.

    Returns one dict per prompt: `ids` (the response tokens, the end token included when it came),
    `text` (decoded, without the end token) and `ended` (False if it ran out of tokens first).
    """
    end_id, pad_id = special_id(enc, "<|end|>"), enc.eot_token
    prompt_ids = encode_prompts(enc, prompts, model.config.block_size - max_new_tokens)
    was_training = model.training
    model.eval()
    results = []
    for i in range(0, len(prompt_ids), batch_size):
        idx, mask = left_pad(prompt_ids[i : i + batch_size], pad_id)
        out = model.generate(idx.to(device), mask.to(device), max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=end_id, pad_id=pad_id, generator=generator)
        for row in out.tolist():
            ended = end_id in row
            ids = row[: row.index(end_id) + 1] if ended else [t for t in row if t != pad_id]
            results.append({"ids": ids, "text": decode_response(enc, ids), "ended": ended})
    model.train(was_training)
    return results


def collate_responses(prompts, responses, pad_id):
    """Prompt and response token lists -> idx, attention_mask, response_mask, all (B, T), left-padded:
    every row ends with its response, and response_mask marks its tokens (the end token included)."""
    idx, attention_mask = left_pad([p + r for p, r in zip(prompts, responses)], pad_id)
    response_mask, _ = left_pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0)
    return idx, attention_mask, response_mask


def token_logprobs(logits, targets, temperature=1.0):
    """Log-prob of each target token and entropy of each distribution, under softmax(logits / temperature).

    logits (..., V) in any float dtype, targets (...) -> (logp (...), entropy (...)) in float32,
    differentiable in the logits through both. The fast path: kernels.token_logprobs (see above).
    """
    if kernels.use_triton(logits):
        return kernels.token_logprobs(logits, targets, temperature)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V): the big tensor the kernel avoids
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # H = -sum_v p_v log p_v
    return logp, entropy


def response_logprobs(model, idx, attention_mask, context_length=1, temperature=1.0):
    """Log-prob and entropy of every token of idx from position context_length on, given the tokens
    before it, at the temperature: (B, T - context_length) each, and the logits that predicted them
    (B, T - context_length, V). The one place a model's log-probs of given tokens are computed.

    PPO passes the prompts' (left-padded) length, so each row holds its response tokens; DPO and the
    evaluations pass 1 (every token) and keep the answer's with the response mask (response_mask[:, 1:]).
    """
    logits = model(idx, attention_mask)[:, context_length - 1 : -1]  # position t's logits predict token t + 1
    logp, entropy = token_logprobs(logits, idx[:, context_length:], temperature)
    return logp, entropy, logits
