"""Talk to any stage's checkpoint in the terminal, or ask several the same question side by side.

    python chat.py --ckpt out/ppo                                   # interactive: you> ... (/quit or Ctrl-D ends)
    python chat.py --ckpt out/sft --prompt "What colour is the milt?" --temperature 0   # one greedy answer
    python chat.py --compare out/sft out/ppo out/dpo --prompt "Hello!"   # one block per model, with scores

Every turn is single-turn: the model sees only <|user|> your prompt <|assistant|> and continues
until <|end|>. Earlier turns are not fed back, because every stage was trained on single-turn
prompts only: a conversation history would be text the model has never seen.

With --compare each answer is scored twice: by the gold judge of the tiny world (what our simulated
humans want; world.json in --data, skipped with a note for other data) and by the learned reward
model (--reward, the proxy PPO optimised, as PPO scores it: an answer cut off before <|end|> gets
PPO's default missing-end penalty). A gap between the two, proxy up and gold down, is reward hacking
seen one answer at a time.

A pretrain checkpoint answers too, but it never saw the chat template: expect it to ramble.
"""

import sys
from pathlib import Path

import torch

import common
from evaluate import MISSING_END_PENALTY
from reward import collate
from sampling import sample_responses
from tokenizer import encode_prompt, encode_response
from world import load_world

parser = common.ArgumentParser(description="Chat with a GPT checkpoint (pretrain, sft, ppo or dpo)")
g = parser.add_argument_group("who answers")
g.add_argument("--ckpt", default="out/ppo", help="a stage folder with model.pt and meta.json")
g.add_argument("--compare", nargs="+", metavar="DIR", help="several stage folders: each answers the same prompt")
g.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
g = parser.add_argument_group("sampling")
g.add_argument("--temperature", type=common.nonnegative_float, default=0.7,
               help="0 = greedy (ppo.py samples at its own --temperature, 1.0 by default)")
g.add_argument("--top-p", type=common.number(float, lambda p: 0 < p <= 1, "must be in (0, 1]"), default=1.0,
               help="nucleus sampling: keep tokens up to this probability mass")
g.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
g.add_argument("--max-new-tokens", type=common.positive_int, default=48)
g.add_argument("--seed", type=int, default=1337, help="each turn samples with seed + turn number")
g = parser.add_argument_group("scores (with --compare)")
g.add_argument("--data", default="data", help="the tiny world's data folder (its world.json is the gold judge)")
g.add_argument("--reward", default="out/reward", help="reward-model folder for the proxy score (skipped if absent)")
g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")


@torch.no_grad()
def proxy_scores(reward_model, enc, prompt, texts, device, ended=None, missing_end_penalty=MISSING_END_PENALTY):
    """Proxy score of each answer, as PPO scores it, in one right-padded batch: (N,) floats. The reward
    model reads (prompt, text <|end|>) at its last real token (right padding, the mask at 0 on the pads);
    an answer that never ended (ended[i] False) gets missing_end_penalty instead (None: the reward
    model's score of the text without <|end|>). An answer that does not fit in the context gets None.
    """
    block = reward_model.config.block_size
    ended = [True] * len(texts) if ended is None else ended
    if missing_end_penalty is not None and not all(ended):
        scores = iter(proxy_scores(reward_model, enc, prompt, [t for t, e in zip(texts, ended) if e], device))
        return [next(scores) if e else missing_end_penalty for e in ended]
    seqs = [encode_prompt(enc, prompt) + encode_response(enc, t, end=e) for t, e in zip(texts, ended)]
    fits = [len(s) <= block for s in seqs]
    kept = [s for s, ok in zip(seqs, fits) if ok]
    if not kept:
        return [None] * len(texts)
    idx, mask = collate(kept, enc.eot_token)  # (N, T) each, right-padded as the reward model trained
    scores = iter(reward_model.score(idx.to(device), mask.to(device)).float().tolist())
    return [next(scores) if ok else None for ok in fits]


def answer(model, enc, prompt, args, device, dtype, turn):
    """One sampled (or greedy) answer: the sample_responses dict {"ids", "text", "ended"}."""
    generator = torch.Generator(device).manual_seed(args.seed + turn)  # same seed for every model: fair comparison
    with common.autocast(device, dtype):
        return sample_responses(model, enc, [prompt], device, args.max_new_tokens, args.temperature,
                                       args.top_k, args.top_p, batch_size=1, generator=generator)[0]


def check_prompt(models, prompt, args):
    """None if the prompt fits every model's context with room for the answer, else why not."""
    for name, (model, enc, _) in models.items():
        room = model.config.block_size - args.max_new_tokens
        n = len(encode_prompt(enc, prompt))
        if n > room:
            return (f"the prompt is {n} tokens; {name} has room for {room} "
                    f"(block size {model.config.block_size} - --max-new-tokens {args.max_new_tokens})")
    return None


def show(models, prompt, args, device, dtype, turn, world, reward):
    """Print each model's answer; in --compare mode one block per model with its gold and proxy scores."""
    results = {name: answer(model, enc, prompt, args, device, dtype, turn) for name, (model, enc, _) in models.items()}
    if not args.compare:
        r = next(iter(results.values()))
        print(f"assistant> {r['text'].strip()}" + ("" if r["ended"] else "  [no <|end|>: cut at --max-new-tokens]"),
              flush=True)
        return results
    texts, ended = [r["text"] for r in results.values()], [r["ended"] for r in results.values()]
    proxies = proxy_scores(reward[0], reward[1], prompt, texts, device, ended) if reward else [None] * len(texts)
    width = max(map(len, results))
    for (name, r), proxy in zip(results.items(), proxies):
        scores = []
        if world is not None:
            scores.append(f"gold {world.gold_score(prompt, r['text']):+.2f}")
        if reward is not None:
            scores.append(f"proxy {proxy:+.2f}" if proxy is not None else "proxy n/a (too long for the reward model)")
        stage = models[name][2].get("stage", "?")
        print(f"--- {name:<{width}}  [{stage}]" + (f"  {' | '.join(scores)}" if scores else ""))
        print(f"assistant> {r['text'].strip()}" + ("" if r["ended"] else "  [no <|end|>: cut at --max-new-tokens]"))
    print(flush=True)
    return results


if __name__ == "__main__":
    args = parser.parse_args()
    device, dtype = common.setup_device(args.device)

    # -- the models: one, or several to compare (named after their folders) ----
    dirs = args.compare or [args.ckpt]
    flag = "--compare" if args.compare else "--ckpt"
    models = {}
    for d in dirs:
        name = Path(d).name if Path(d).name not in models else str(d)
        model, enc, meta = common.load_policy(d, device, flag=flag)
        model.eval()
        if args.max_new_tokens >= model.config.block_size:
            common.die(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {d} "
                       f"(block size {model.config.block_size})")
        models[name] = (model, enc, meta)
        print(f"loaded {d}: stage {meta.get('stage')}, step {meta.get('step')}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # -- the judges, for --compare ------------------------------------------------
    world = reward = None
    if args.compare:
        world = load_world(args.data)
        if world is None:
            print(f"note: no world.json in {args.data}: gold scores skipped (they exist only for the tiny world)")
        if (Path(args.reward) / "meta.json").exists():
            rm, rm_enc, _ = common.load_scalar_model(args.reward, device)
            reward = (rm.eval(), rm_enc)
        else:
            print(f"note: no reward model in {args.reward}: proxy scores skipped")
    print(f"sampling: temperature {args.temperature}" + (" (greedy)" if args.temperature == 0 else "")
          + f", top-p {args.top_p}, top-k {args.top_k}, up to {args.max_new_tokens} new tokens, seed {args.seed}")

    # -- one prompt, or the loop ----------------------------------------------------
    if args.prompt is not None:
        problem = check_prompt(models, args.prompt, args)
        if problem:
            common.die(f"--prompt: {problem}")
        show(models, args.prompt, args, device, dtype, 0, world, reward)
        raise SystemExit(0)
    print("single-turn chat: each prompt is answered on its own (no memory of earlier turns); /quit or Ctrl-D ends")
    turn = 0
    while True:
        try:
            prompt = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not sys.stdin.isatty():
            print(prompt)  # echo piped input, so a transcript reads like the terminal session
        if prompt.strip() == "/quit":
            break
        if not prompt.strip():
            continue
        problem = check_prompt(models, prompt, args)
        if problem:
            print(f"({problem}: try a shorter one)")
            continue
        show(models, prompt, args, device, dtype, turn, world, reward)
        turn += 1
