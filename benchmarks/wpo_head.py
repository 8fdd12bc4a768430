"""What WPO's weights cost in the log-prob head: forward + backward of ``chunked_token_stats`` with and
without ``log sum_v p_v^2``, timed side by side in one process (medians of interleaved repeats).

    OMP_NUM_THREADS=2 python benchmarks/wpo_head.py --tokens 2048 --hidden 512 --vocab 32000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from miopt.logprobs.forward import chunked_token_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="response tokens in the batch")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024, help="rows per head chunk (--logprob-chunk)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="autocast bf16")
    args = parser.parse_args()

    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,))

    def step(with_log_sum_sq: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logps, _ = chunked_token_stats(hidden, targets, head, args.chunk, with_log_sum_sq)
        logps.sum().backward()
        return time.perf_counter() - started

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for flag in (False, True):
            times[flag].append(step(flag))
    plain, weighted = (statistics.median(times[flag][1:]) for flag in (False, True))
    print(
        f"head forward+backward, {args.tokens} tokens x vocab {args.vocab}, {torch.get_num_threads()} threads"
    )
    print(f"  log-probs only:            {plain:.3f} s (median of {args.repeats})")
    print(f"  + log sum p^2 (WPO):       {weighted:.3f} s")
    print(f"  ratio:                     {weighted / plain:.2f}x")


if __name__ == "__main__":
    main()
