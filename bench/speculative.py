"""Speculative decoding against plain decoding of the same prompts, timed in the same run.

    python bench/speculative.py TARGET_RUN DRAFT_RUN [--prompts 20] [--tokens 100]

The prompts are the first 40 characters of lines of Python's own `json` package (the kind of text
the built-in corpus holds). For each setting (greedy and
T=0.8 top-40; k = 2, 4, 6) it prints how many of the outputs are identical to plain decoding
(all of them at T=0: the rule keeps the target's greedy output), the acceptance rate (accepted /
proposed draft tokens; proposals after a rejection count as not accepted), tokens per target
pass, and the tokens/s ratio speculative / plain. One CPU thread: the ratio is the algorithm's,
not the thread pool's.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from trainer.generate import generate, load_model
from trainer.speculative import speculative_generate

SETTINGS = ((0.0, 2), (0.0, 4), (0.0, 6), (0.8, 2), (0.8, 4))


def prompts(tok, n: int) -> list[torch.Tensor]:
    lines = [line for f in sorted(Path(json.__file__).parent.glob("*.py"))
             for line in f.read_text().splitlines() if len(line.strip()) > 20]
    random.Random(0).shuffle(lines)
    return [torch.tensor([tok.encode(line[:40])]) for line in lines[:n]]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("draft")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--tokens", type=int, default=100)
    args = p.parse_args(argv)
    _, tok, target = load_model(args.target, None, None, [], prog="bench/speculative.py")
    _, _, draft = load_model(args.draft, None, None, [], prog="bench/speculative.py")
    torch.set_num_threads(1)
    batch = prompts(tok, args.prompts)
    for temperature, k in SETTINGS:
        same = accepted = drafted = emitted = passes = 0
        t_plain = t_spec = 0.0
        for i, prompt in enumerate(batch):
            start = time.perf_counter()
            plain = generate(target, prompt, args.tokens, temperature, 40, torch.Generator().manual_seed(i))
            mid = time.perf_counter()
            out, stats = speculative_generate(target, draft, prompt, args.tokens, k, temperature, 40,
                                              torch.Generator().manual_seed(i))
            t_plain, t_spec = t_plain + mid - start, t_spec + time.perf_counter() - mid
            same += torch.equal(out, plain)
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
            emitted, passes = emitted + stats.emitted, passes + stats.target_passes
        plain_speed, spec_speed = len(batch) * args.tokens / t_plain, emitted / t_spec
        print(f"T={temperature} k={k}: identical to plain {same}/{len(batch)}, acceptance {accepted / drafted:.3f}, "
              f"{emitted / passes:.2f} tokens/target pass, plain {plain_speed:.0f} tok/s, speculative "
              f"{spec_speed:.0f} tok/s, speed-up {spec_speed / plain_speed:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
