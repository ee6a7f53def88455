"""Speed comparisons that run both sides in one process and print their ratio.

    python scripts/benchmark.py generate     # new tokens/s: jaxsftdpo vs transformers greedy
    python scripts/benchmark.py memory       # per-device bytes under FSDP, 1/2/4/8 devices
    python scripts/benchmark.py train        # SFT/DPO x full/LoRA step time vs PyTorch
    ... generate --shape smollm2 / train --shape smollm2: a SmolLM2-135M-shaped Llama instead

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


# SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M-Instruct), with random weights.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def reference_config(args):
    """The transformers config of the benchmark's model (`--shape`), and a line naming it."""
    from transformers import GPT2Config, LlamaConfig

    if args.shape == "smollm2":
        config = LlamaConfig(**SMOLLM2_SHAPE)
        return config, ("SmolLM2-135M shape (Llama, 30 layers, width 576, 9 query / 3 key-value "
                        "heads, vocab 49152, tied)")
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                        n_positions=1024, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return config, (f"GPT-2 {args.layers} layers, width {args.width}, {args.heads} heads, "
                    f"vocab {config.vocab_size}")


def our_model(hf_config, weights: dict | None = None):
    """Our model of `hf_config` (a transformers config), with `weights` (HF state dict as
    numpy) when given, else its own random init."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxsftdpo.models import FAMILIES

    family = FAMILIES[hf_config.model_type]
    model = family.build(family.Config.from_hf(hf_config.to_dict()))
    if weights is None:
        return model
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(family.from_hf(path, weights[family.hf_name(path)])))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def peft_targets(hf_config) -> dict:
    """PEFT's LoraConfig arguments adapting every linear layer but the output embedding."""
    if hf_config.model_type == "gpt2":
        return dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj"])


def bench_generate(args):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxsftdpo.generate import generate

    torch.manual_seed(0)
    hf_config, described = reference_config(args)
    reference = AutoModelForCausalLM.from_config(hf_config).eval()
    model = our_model(hf_config, {k: v.numpy() for k, v in reference.state_dict().items()})

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
    print(f"model: {described}; batch {args.batch}, prompt {args.prompt_len}, {new} new tokens "
          f"(greedy, fp32)")
    print(f"jaxsftdpo     {tokens / jax_s:10.1f} new tokens/s  ({jax_s:.3f} s; first call with "
          f"compile {compile_s:.2f} s)")
    print(f"transformers  {tokens / torch_s:10.1f} new tokens/s  ({torch_s:.3f} s)")
    print(f"ratio (jaxsftdpo / transformers): {torch_s / jax_s:.2f}x; "
          f"identical greedy tokens: {agree:.1%}")


def bench_memory(args):
    """Per-device bytes of parameters, optimizer state and the train step's peak under FSDP.

    Nothing full-size is allocated: the model is abstract (`nnx.eval_shape`), the optimizer
    state's placement comes from compiling `tx.init` as the trainer runs it, and the peak from
    XLA's memory analysis of the compiled SFT train step.
    """
    import os
    import sys
    most = max(args.devices)
    if "jax" not in sys.modules:  # CPU devices to spread over, before JAX starts
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={most}")
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxsftdpo import lora, sharding, steps
    from jaxsftdpo.config import stage
    from jaxsftdpo.models import gpt2

    if jax.device_count() < most:
        raise SystemExit(f"{jax.device_count()} devices; --devices asks for {most}")
    cfg = gpt2.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                          remat=args.remat)

    def model(kind):
        m = gpt2.build(cfg)
        if kind == "lora":
            lora.apply_lora(m, r=args.lora_r, alpha=2.0 * args.lora_r)
        return m

    def abstract(tree, mesh, rules):
        shardings = sharding.state_shardings(tree, mesh, rules)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    def per_device(tree) -> int:
        return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree))

    def total(tree) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    mib = lambda n: n / 2**20
    print(f"GPT-2 {args.layers} layers, width {args.width}, {args.heads} heads, vocab "
          f"{cfg.vocab_size}, fp32 params and AdamW state; SFT step on batch {args.batch} x "
          f"{args.seq} tokens{', remat' if args.remat else ''}; mesh (data=1, fsdp=N, "
          f"tensor=1); MiB per device")
    print(f"{'param':5} {'N':>2} {'params':>9} {'opt state':>10} {'temps':>9} {'peak':>9}   "
          f"{'params x N / total':>18}")
    for kind in ("fft", "lora"):
        for n in args.devices:
            mesh = sharding.make_mesh(dict(data=1, fsdp=n, tensor=1), jax.devices()[:n])
            graphdef, trainable, frozen = lora.split_trainable(
                nnx.eval_shape(lambda: model(kind)), kind)
            trainable = abstract(trainable, mesh, gpt2.PARTITION_RULES)
            frozen = abstract(frozen, mesh, gpt2.PARTITION_RULES)
            tx, _ = steps.make_optimizer(stage("sft", steps=10), 10)
            placed = steps.train_state_shardings(tx, trainable)  # as the trainer places it
            opt_state = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                jax.eval_shape(tx.init, trainable), placed.opt_state)
            state = steps.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=placed.step),
                                     trainable, opt_state)
            rows = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
            token = lambda dtype: jax.ShapeDtypeStruct((1, args.batch, args.seq), dtype,
                                                       sharding=rows)
            batch = {"input_ids": token(jnp.int32), "attention_mask": token(jnp.bool_),
                     "loss_mask": token(jnp.bool_)}
            compiled = steps.make_train_step("sft", graphdef, tx, None).lower(
                state, frozen, None, batch, None).compile()
            stats = compiled.memory_analysis()
            # XLA:CPU's peak_memory_in_bytes counts only the arguments; its buffer assignment
            # gives the rest: live arguments and outputs (donated ones counted once) + temps.
            peak = max(stats.peak_memory_in_bytes,
                       stats.argument_size_in_bytes + stats.output_size_in_bytes
                       - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
            params = per_device((trainable, frozen))
            print(f"{kind:5} {n:2d} {mib(params):9.1f} {mib(per_device(opt_state)):10.1f} "
                  f"{mib(stats.temp_size_in_bytes):9.1f} {mib(peak):9.1f}   "
                  f"{params * n / total((trainable, frozen)):18.3f}", flush=True)


def bench_train(args):
    """Step time of SFT and DPO, full and LoRA, against PyTorch + transformers (+ peft)."""
    import copy

    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from flax import nnx
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jaxsftdpo import lora, steps
    from jaxsftdpo.config import stage
    from jaxsftdpo.data import batching

    hf_config, described = reference_config(args)
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    ids = {side: rng.integers(0, hf_config.vocab_size, (b, t)).astype(np.int32)
           for side in ("chosen", "rejected")}
    loss_mask = np.zeros((b, t), bool)
    loss_mask[:, t // 2:] = True           # the second half is the completion
    ones = np.ones((b, t), bool)
    # The trainer bounds the scored tokens per row from the data and runs the LM head there only.
    scored_tokens = batching.scored_tokens_bound([batching.Sequence(row, mask) for side in
                                                  ids.values() for row, mask in zip(side, loss_mask)])
    optimizer_stage = stage("sft", steps=1000, learning_rate=1e-5)
    lr, beta = optimizer_stage.learning_rate, 0.1

    def jax_step(kind, param, reference="frozen_copy"):
        model = our_model(hf_config)
        if param == "lora":
            lora.apply_lora(model, r=args.lora_r, alpha=2.0 * args.lora_r)
        graphdef, trainable, frozen = lora.split_trainable(model, param)
        tx, _ = steps.make_optimizer(optimizer_stage, 1000)
        state = steps.init_train_state(tx, trainable)
        dpo, ref = None, None
        if kind == "sft":
            batch = {"input_ids": ids["chosen"], "attention_mask": ones, "loss_mask": loss_mask}
        else:
            dpo = steps.DPOSettings(beta=beta, loss_type="sigmoid", label_smoothing=0.0,
                                    sft_weight=0.0, reference=reference)
            batch = {f"{side}_{name}": value for side in ("chosen", "rejected")
                     for name, value in (("input_ids", ids[side]), ("attention_mask", ones),
                                         ("loss_mask", loss_mask))}
            if reference == "precomputed":
                batch["ref_chosen_logps"] = np.zeros(b, np.float32)
                batch["ref_rejected_logps"] = np.zeros(b, np.float32)
            else:
                ref = jax.tree.map(jnp.copy, trainable)
        batch = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)   # one micro-batch
        step_fn = steps.make_train_step(kind, graphdef, tx, dpo, scored_tokens=scored_tokens)
        holder = {"state": state}

        def run():
            holder["state"], metrics = step_fn(holder["state"], frozen, ref, batch, None)
            jax.block_until_ready(metrics["loss"])
        return run

    def torch_step(kind, param):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config)
        reference = None
        if param == "lora":
            model = get_peft_model(model, LoraConfig(
                r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                **peft_targets(hf_config)))
        elif kind == "dpo":
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        tids = {side: torch.from_numpy(v).long() for side, v in ids.items()}
        tmask = torch.from_numpy(loss_mask[:, 1:])

        def seq_logps(m, input_ids):
            logits = m(input_ids).logits[:, :-1].float()
            logps = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:, None])[..., 0]
            return (logps * tmask.repeat(input_ids.shape[0] // b, 1)).sum(-1)

        def run():
            if kind == "sft":
                logits = model(tids["chosen"]).logits[:, :-1]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      tids["chosen"][:, 1:].reshape(-1), reduction="none")
                loss = (nll * tmask.reshape(-1)).sum() / tmask.sum()
            else:
                both = torch.cat([tids["chosen"], tids["rejected"]])
                with torch.no_grad():
                    if reference is None:
                        with model.disable_adapter():
                            ref = seq_logps(model, both)
                    else:
                        ref = seq_logps(reference, both)
                pol = seq_logps(model, both)
                margin = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
                loss = -F.logsigmoid(beta * margin).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    print(f"{described}, fp32; batch {b} (DPO: {b} pairs) x {t} tokens, AdamW; "
          f"LoRA r={args.lora_r} on every linear layer; the second half of each row is the "
          f"completion (jaxsftdpo's LM head runs at its {scored_tokens} positions, as the "
          f"trainer does); best of {args.repeats} steps after a warm-up step; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    print(f"{'case':28s} {'jaxsftdpo s':>12s} {'torch s':>9s} {'speed-up':>9s} "
          f"{'jax tokens/s':>13s}", flush=True)
    timed = {}
    for kind in args.kinds:
        tokens = b * t * (2 if kind == "dpo" else 1)
        for param in ("fft", "lora"):
            ours = jax_step(kind, param)
            ours()                                   # compile
            jax_s = best_time(ours, args.repeats)
            theirs = torch_step(kind, param)
            theirs()
            torch_s = best_time(theirs, args.repeats)
            timed[kind, param] = jax_s
            name = f"{kind} {param}" + (" (frozen ref)" if kind == "dpo" else "")
            print(f"{name:28s} {jax_s:12.3f} {torch_s:9.3f} {torch_s / jax_s:8.2f}x "
                  f"{tokens / jax_s:13.0f}", flush=True)
            if kind == "dpo":
                pre = jax_step(kind, param, reference="precomputed")
                pre()
                pre_s = best_time(pre, args.repeats)
                print(f"{f'dpo {param} (precomputed ref)':28s} {pre_s:12.3f} {'':9s} "
                      f"{'':9s} {tokens / pre_s:13.0f}   frozen copy / precomputed: "
                      f"{jax_s / pre_s:.2f}x", flush=True)
        print(f"{kind}: LoRA step / full step = {timed[kind, 'lora'] / timed[kind, 'fft']:.2f}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generate", help="new tokens/s vs transformers greedy generation")
    gen.add_argument("--shape", choices=["gpt2", "smollm2"], default="gpt2",
                     help="gpt2: --layers/--width/--heads; smollm2: SmolLM2-135M's shapes")
    gen.add_argument("--layers", type=int, default=6)
    gen.add_argument("--width", type=int, default=256)
    gen.add_argument("--heads", type=int, default=8)
    gen.add_argument("--batch", type=int, default=8)
    gen.add_argument("--prompt-len", type=int, default=32)
    gen.add_argument("--new-tokens", type=int, default=128)
    gen.add_argument("--repeats", type=int, default=3)
    gen.set_defaults(run=bench_generate)
    mem = sub.add_parser("memory", help="per-device bytes of params, optimizer state and peak "
                                        "under FSDP (abstract GPT-2-medium, CPU devices)")
    mem.add_argument("--layers", type=int, default=24)
    mem.add_argument("--width", type=int, default=1024)
    mem.add_argument("--heads", type=int, default=16)
    mem.add_argument("--batch", type=int, default=8)
    mem.add_argument("--seq", type=int, default=256)
    mem.add_argument("--lora-r", type=int, default=8)
    mem.add_argument("--remat", action="store_true", help="rematerialise each block")
    mem.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    mem.set_defaults(run=bench_memory)
    train = sub.add_parser("train", help="SFT/DPO x full/LoRA step time vs PyTorch + transformers")
    train.add_argument("--shape", choices=["gpt2", "smollm2"], default="gpt2",
                       help="gpt2: --layers/--width/--heads; smollm2: SmolLM2-135M's shapes")
    train.add_argument("--layers", type=int, default=12)
    train.add_argument("--width", type=int, default=768)
    train.add_argument("--heads", type=int, default=12)
    train.add_argument("--batch", type=int, default=8)
    train.add_argument("--seq", type=int, default=128)
    train.add_argument("--lora-r", type=int, default=8)
    train.add_argument("--repeats", type=int, default=3)
    train.add_argument("--kinds", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    train.set_defaults(run=bench_train)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
