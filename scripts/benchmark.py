"""Speed comparisons that run both sides in one process and print their ratio.

    python scripts/benchmark.py generate     # new tokens/s: jaxsftdpo vs transformers greedy

Machines are shared and noisy, so each case is timed as the best of a few repeats and reported
next to its reference measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_generate(args):
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    from jaxsftdpo.generate import generate
    from jaxsftdpo.models.gpt2 import GPT2, GPT2Config, hf_name

    torch.manual_seed(0)
    hf_config = HFConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                         n_positions=1024)
    reference = GPT2LMHeadModel(hf_config).eval()
    model = GPT2(GPT2Config.from_hf(hf_config.to_dict()), rngs=nnx.Rngs(0))
    weights = {k: v.numpy() for k, v in reference.state_dict().items()}
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.value = jnp.asarray(weights[hf_name(path)])
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, hf_config.vocab_size, (args.batch, args.prompt_len))
    new = args.new_tokens

    def run_jax():
        return generate(model, prompts, max_new_tokens=new)

    def run_torch():
        with torch.no_grad():
            return reference.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=0)

    start = time.perf_counter()
    ours = run_jax()
    compile_s = time.perf_counter() - start
    theirs = run_torch()[:, args.prompt_len:].numpy()
    agree = float((ours == theirs).mean())
    jax_s = best_time(run_jax, args.repeats)
    torch_s = best_time(run_torch, args.repeats)
    tokens = args.batch * new
    print(f"model: GPT-2 {args.layers} layers, width {args.width}, vocab {hf_config.vocab_size}; "
          f"batch {args.batch}, prompt {args.prompt_len}, {new} new tokens (greedy)")
    print(f"jaxsftdpo     {tokens / jax_s:10.1f} new tokens/s  ({jax_s:.3f} s; first call with "
          f"compile {compile_s:.2f} s)")
    print(f"transformers  {tokens / torch_s:10.1f} new tokens/s  ({torch_s:.3f} s)")
    print(f"ratio (jaxsftdpo / transformers): {torch_s / jax_s:.2f}x; "
          f"identical greedy tokens: {agree:.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generate", help="new tokens/s vs transformers greedy generation")
    gen.add_argument("--layers", type=int, default=6)
    gen.add_argument("--width", type=int, default=256)
    gen.add_argument("--heads", type=int, default=8)
    gen.add_argument("--batch", type=int, default=8)
    gen.add_argument("--prompt-len", type=int, default=32)
    gen.add_argument("--new-tokens", type=int, default=128)
    gen.add_argument("--repeats", type=int, default=3)
    gen.set_defaults(run=bench_generate)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
