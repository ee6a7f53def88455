"""Speed comparisons that run both sides in one process and print their ratio.

    python scripts/benchmark.py generate     # new tokens/s: jaxsftdpo vs transformers greedy
    python scripts/benchmark.py memory       # per-device bytes under FSDP, 1/2/4/8 devices
    python scripts/benchmark.py train        # SFT/DPO x full/LoRA step time vs PyTorch
    python scripts/benchmark.py attention    # one attention layer: einsum vs fused path
    ... generate --shape smollm2 / train --shape smollm2: a SmolLM2-135M-shaped Llama instead
    ... --no-reference: jaxsftdpo alone (no torch, transformers or peft), for accelerators

Machines are shared and noisy, so each case is timed as the best of a few repeats and reported
next to its reference measured in the same run. generate and train also print the model FLOPs
per token (`jaxsftdpo.flops`) and the MFU against the device's peak.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np

# What `steps.make_optimizer` reads of a stage: AdamW, constant learning rate, clipping at 1.
ADAMW = SimpleNamespace(learning_rate=1e-5, schedule="constant", warmup_steps=0,
                        max_grad_norm=1.0, weight_decay=0.0)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M-Instruct), with random weights.
SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=576,
                     intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def model_shape(args) -> tuple[dict, str]:
    """The config.json of the benchmark's model (`--shape`, `--layers`), and a line naming it."""
    if args.shape == "smollm2":
        layers = args.layers or SMOLLM2_SHAPE["num_hidden_layers"]
        return ({**SMOLLM2_SHAPE, "num_hidden_layers": layers},
                f"SmolLM2-135M shape (Llama, {layers} layers, width 576, 9 query / 3 key-value "
                f"heads, vocab 49152, tied)")
    layers = args.layers or args.gpt2_layers
    return (dict(model_type="gpt2", n_layer=layers, n_embd=args.width, n_head=args.heads,
                 n_positions=1024, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0),
            f"GPT-2 {layers} layers, width {args.width}, {args.heads} heads, vocab 50257")


def reference_config(shape: dict):
    """transformers' config of `shape` (importing transformers imports torch)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**shape)


def our_config(shape: dict, args):
    """Our config of `shape`, computing in `--dtype` with `--attention`."""
    import jax.numpy as jnp

    from jaxsftdpo.models import FAMILIES

    return FAMILIES[shape["model_type"]].Config.from_hf(
        shape, dtype=jnp.dtype(args.dtype), attention=args.attention)


def our_model(shape: dict, args, weights: dict | None = None):
    """Our model of `our_config`, with `weights` (HF state dict as numpy) when given, else its
    own random init."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxsftdpo.models import FAMILIES

    family = FAMILIES[shape["model_type"]]
    model = family.build(our_config(shape, args))
    if weights is None:
        return model
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(family.from_hf(path, weights[family.hf_name(path)])))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def peft_targets(model_type: str) -> dict:
    """PEFT's LoraConfig arguments adapting every linear layer but the output embedding."""
    if model_type == "gpt2":
        return dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj"])


def flops_and_peak(model_config, seq_len: int, *, training: bool):
    """Model FLOPs per token of `seq_len`-token sequences, the peak FLOP/s of the device the
    benchmark runs on (one), and a line saying both."""
    import jax

    from jaxsftdpo import flops

    per_token = flops.model_flops_per_token(model_config, seq_len, training=training)
    peak = flops.device_peak_flops(dtype=model_config.dtype)
    return per_token, peak, (f"model FLOPs per token {per_token / 1e9:.3f} G "
                             f"({'training' if training else 'forward'}, {seq_len} positions); "
                             f"peak {peak / 1e12:.1f} TFLOP/s ({jax.devices()[0].device_kind}, "
                             f"{jax.numpy.dtype(model_config.dtype).name})")


def bench_generate(args):
    from jaxsftdpo.flops import mfu
    from jaxsftdpo.generate import generate

    shape, described = model_shape(args)
    reference, weights = None, None
    if args.reference:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(reference_config(shape)).eval()
        weights = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = our_model(shape, args, weights)

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.config.vocab_size, (args.batch, args.prompt_len))
    new = args.new_tokens

    def run_jax(**options):
        return generate(model, prompts, max_new_tokens=new, **options)

    def run_torch(**sampling):
        with torch.no_grad():
            return reference.generate(torch.tensor(prompts), max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=0,
                                      **(sampling or {"do_sample": False}))

    start = time.perf_counter()
    ours = run_jax()
    compile_s = time.perf_counter() - start
    jax_s = best_time(run_jax, args.repeats)
    tokens = args.batch * new
    # Each new token's forward attends over the whole cache, prompt + new tokens long.
    per_token, peak, flops_line = flops_and_peak(model.config, args.prompt_len + new,
                                                 training=False)
    print(f"model: {described}; batch {args.batch}, prompt {args.prompt_len}, {new} new tokens "
          f"(greedy, {args.dtype}, attention {args.attention})")
    print(flops_line)
    print(f"jaxsftdpo     {tokens / jax_s:10.1f} new tokens/s  ({jax_s:.3f} s; first call with "
          f"compile {compile_s:.2f} s; MFU {mfu(tokens / jax_s, per_token, peak):.2%})")
    if model.config.dtype == np.float32:
        for options, what in (({"checked_head": False}, "without the checked bfloat16 head "
                                                        "(every logit in float32)"),
                              ({"decode_dtype": "bfloat16"}, "a bfloat16 copy of the model "
                                                             "(decode_dtype)")):
            theirs = run_jax(**options)
            seconds = best_time(lambda: run_jax(**options), args.repeats)
            print(f"  {what}: {tokens / seconds:.1f} new tokens/s, {jax_s / seconds:.2f}x the "
                  f"default's speed; tokens equal to float32 greedy's: "
                  f"{float((theirs == ours).mean()):.1%}", flush=True)
    if reference is None:
        return
    theirs = run_torch()[:, args.prompt_len:].numpy()
    agree = float((ours == theirs).mean())
    torch_s = best_time(run_torch, args.repeats)
    print(f"transformers  {tokens / torch_s:10.1f} new tokens/s  ({torch_s:.3f} s)")
    print(f"ratio (jaxsftdpo / transformers): {torch_s / jax_s:.2f}x; "
          f"identical greedy tokens: {agree:.1%}", flush=True)
    # Sampling as the sonnet task does (its defaults); the two draw different tokens.
    sampling = {"temperature": 1.2, "top_p": 0.9}
    run_jax(**sampling)
    jax_sampled_s = best_time(lambda: run_jax(**sampling), args.repeats)
    torch_sampled_s = best_time(lambda: run_torch(do_sample=True, top_k=0, **sampling),
                                args.repeats)
    print(f"sampling (temperature {sampling['temperature']}, top-p {sampling['top_p']}): "
          f"jaxsftdpo {tokens / jax_sampled_s:.1f}, "
          f"transformers {tokens / torch_sampled_s:.1f} new tokens/s; ratio "
          f"{torch_sampled_s / jax_sampled_s:.2f}x")


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
            tx, _ = steps.make_optimizer(ADAMW, 10)
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


BETA = 0.1


def train_inputs(config, args) -> SimpleNamespace:
    """`--batch` random rows (DPO: pairs) of `--seq` tokens whose second half is the completion,
    and the bound on scored tokens per row the trainer would derive from them."""
    from jaxsftdpo.data import batching

    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    ids = {side: rng.integers(0, config.vocab_size, (b, t)).astype(np.int32)
           for side in ("chosen", "rejected")}
    loss_mask = np.zeros((b, t), bool)
    loss_mask[:, t // 2:] = True
    scored_tokens = batching.scored_tokens_bound([batching.Sequence(row, mask) for side in
                                                  ids.values() for row, mask in zip(side, loss_mask)])
    return SimpleNamespace(ids=ids, loss_mask=loss_mask, scored_tokens=scored_tokens)


def jax_train_step(shape, args, inputs, kind, param, *, reference="frozen_copy",
                   target_modules="all-linear"):
    """`run()`: one jaxsftdpo train step (`steps.make_train_step`) of `kind` ("sft"/"dpo") and
    `param` ("fft"/"lora": r = `--lora-r` on `target_modules`) on `inputs`, state carried over;
    `run.tx` is its optimizer and `run.state()` its current `TrainState`."""
    import jax
    import jax.numpy as jnp

    from jaxsftdpo import lora, steps

    model = our_model(shape, args)
    if param == "lora":
        lora.apply_lora(model, r=args.lora_r, alpha=2.0 * args.lora_r,
                        target_modules=target_modules)
    graphdef, trainable, frozen = lora.split_trainable(model, param)
    # Committed to the device as the step's outputs are, so its second call compiles nothing.
    trainable, frozen = jax.device_put((trainable, frozen), jax.devices()[0])
    tx, _ = steps.make_optimizer(ADAMW, 1000)
    state = steps.init_train_state(tx, trainable)
    ids, loss_mask, b = inputs.ids, inputs.loss_mask, args.batch
    ones = np.ones(loss_mask.shape, bool)
    dpo, ref = None, None
    if kind == "sft":
        batch = {"input_ids": ids["chosen"], "attention_mask": ones, "loss_mask": loss_mask}
    else:
        dpo = steps.DPOSettings(beta=BETA, loss_type="sigmoid", label_smoothing=0.0,
                                sft_weight=0.0, reference=reference)
        batch = {f"{side}_{name}": value for side in ("chosen", "rejected")
                 for name, value in (("input_ids", ids[side]), ("attention_mask", ones),
                                     ("loss_mask", loss_mask))}
        if reference == "precomputed":
            batch["ref_chosen_logps"] = np.zeros(b, np.float32)
            batch["ref_rejected_logps"] = np.zeros(b, np.float32)
        else:
            ref = jax.tree.map(jnp.copy, trainable)
    batch = jax.device_put(jax.tree.map(lambda x: x[None], batch),   # one micro-batch
                           jax.devices()[0])
    step_fn = steps.make_train_step(kind, graphdef, tx, dpo, scored_tokens=inputs.scored_tokens)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step_fn(holder["state"], frozen, ref, batch, None)
        jax.block_until_ready(metrics["loss"])
    run.tx, run.state = tx, lambda: holder["state"]
    return run


def bench_train(args):
    """Step time of SFT and DPO, full and LoRA, against PyTorch + transformers (+ peft)."""
    from jaxsftdpo.flops import mfu

    shape, described = model_shape(args)
    config = our_config(shape, args)
    inputs = train_inputs(config, args)
    ids, loss_mask, scored_tokens = inputs.ids, inputs.loss_mask, inputs.scored_tokens
    b, t, beta = args.batch, args.seq, BETA

    def jax_step(kind, param, reference="frozen_copy"):
        return jax_train_step(shape, args, inputs, kind, param, reference=reference)

    def torch_step(kind, param):
        import copy

        import torch
        import torch.nn.functional as F
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(reference_config(shape))
        reference = None
        if param == "lora":
            model = get_peft_model(model, LoraConfig(
                r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                **peft_targets(shape["model_type"])))
        elif kind == "dpo":
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=ADAMW.learning_rate, weight_decay=0.0)
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

    per_token, peak, flops_line = flops_and_peak(config, t, training=True)
    threads = ""
    if args.reference:
        import torch
        threads = f"; torch threads {torch.get_num_threads()}"
    print(f"{described}, {args.dtype} compute, attention {args.attention}; batch {b} (DPO: {b} "
          f"pairs) x {t} tokens, AdamW; LoRA r={args.lora_r} on every linear layer; the second "
          f"half of each row is the completion (jaxsftdpo's LM head runs at its {scored_tokens} "
          f"positions, as the trainer does); best of {args.repeats} steps after a warm-up "
          f"step{threads}", flush=True)
    print(flops_line, flush=True)
    print(f"{'case':28s} {'jaxsftdpo s':>12s} {'torch s':>9s} {'speed-up':>9s} "
          f"{'jax tokens/s':>13s} {'MFU':>7s}", flush=True)

    def time_jax(step):
        step()                                       # compile
        return best_time(step, args.repeats)

    def time_torch(kind, param):
        if not args.reference:
            return None
        theirs = torch_step(kind, param)
        theirs()
        return best_time(theirs, args.repeats)

    def row(name, jax_s, tokens, torch_s=None):
        versus = f"{torch_s:9.3f} {torch_s / jax_s:8.2f}x" if torch_s else f"{'':9s} {'':9s}"
        return (f"{name:28s} {jax_s:12.3f} {versus} {tokens / jax_s:13.0f} "
                f"{mfu(tokens / jax_s, per_token, peak):7.2%}")

    timed = {}
    for kind in args.kinds:
        tokens = b * t * (2 if kind == "dpo" else 1)
        for param in ("fft", "lora"):
            jax_s = timed[kind, param] = time_jax(jax_step(kind, param))
            name = f"{kind} {param}" + (" (frozen ref)" if kind == "dpo" else "")
            print(row(name, jax_s, tokens, time_torch(kind, param)), flush=True)
            if kind == "dpo" and args.precomputed_ref:
                pre_s = timed[kind, param, "precomputed"] = time_jax(
                    jax_step(kind, param, reference="precomputed"))
                print(row(f"dpo {param} (precomputed ref)", pre_s, tokens)
                      + f"   frozen copy / precomputed: {jax_s / pre_s:.2f}x", flush=True)
        ratio = f"{kind}: LoRA step / full step = {timed[kind, 'lora'] / timed[kind, 'fft']:.2f}"
        if (kind, "lora", "precomputed") in timed:
            precomputed = timed[kind, "lora", "precomputed"] / timed[kind, "fft", "precomputed"]
            ratio += f" (frozen ref), {precomputed:.2f} (precomputed ref)"
        print(ratio, flush=True)


def bench_profile(args):
    """Where a train step's time goes: each XLA op's time from a JAX profiler trace, grouped by
    kind (matrix multiplications, elementwise fusions and reductions, copies, gathers and
    scatters, the rest), for a full step, a LoRA step and a LoRA step whose only adapter is on
    the first linear layer (every frozen weight's forward and input-gradient passes, almost no
    adapter work), plus the optimizer update timed alone on each case's trainable state."""
    import jax

    from jaxsftdpo import lora, steps

    shape, described = model_shape(args)
    inputs = train_inputs(our_config(shape, args), args)
    # An attention projection of the first block: the backward pass must reach it through
    # every frozen layer.
    linears = list(lora.linear_modules(our_model(shape, args)))
    first_linear = next(path for path in linears if ".0." in path and "attn" in path)
    cases = (("full", "fft", "all-linear"), ("LoRA", "lora", "all-linear"),
             (f"LoRA on {first_linear} only", "lora", [first_linear]))
    print(f"{described}, {args.dtype}; {args.kind} step, batch {args.batch} x {args.seq} tokens; "
          f"LoRA r={args.lora_r}; ms per step by op kind, from a profiler trace of "
          f"{args.repeats} steps", flush=True)
    print(f"{'case':40s} {'step':>8s} " + " ".join(f"{k:>12s}" for k in OP_KINDS)
          + f" {'optimizer':>10s}", flush=True)
    for name, param, targets in cases:
        run = jax_train_step(shape, args, inputs, args.kind, param, target_modules=targets)
        run()                                                   # compile
        step_s = best_time(run, args.repeats)
        by_kind = traced_op_kinds(run, args.repeats)
        # The step's own optimizer on its own state, the trainable weights standing in for
        # gradients of their shape.
        state = run.state()
        update = jax.jit(lambda state, grads: steps.optimizer_update(run.tx, state, grads))
        jax.block_until_ready(update(state, state.trainable))
        optimizer_s = best_time(lambda: jax.block_until_ready(update(state, state.trainable)),
                                args.repeats)
        print(f"{name:40s} {step_s * 1e3:8.1f} "
              + " ".join(f"{by_kind.get(k, 0.0) * 1e3:12.1f}" for k in OP_KINDS)
              + f" {optimizer_s * 1e3:10.1f}", flush=True)


OP_KINDS = ("matmul", "elementwise", "copy", "gather", "other")


def traced_op_kinds(run, repeats: int) -> dict:
    """Seconds per step spent in each of `OP_KINDS`, from a profiler trace of `repeats` calls
    of `run` (CPU: XLA's thunk events, named after the HLO instructions)."""
    import gzip
    import json
    import tempfile
    from pathlib import Path

    import jax

    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir, create_perfetto_trace=True)
        for _ in range(repeats):
            run()
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(next(Path(logdir).rglob("*.trace.json.gz"))))
    seconds = {}
    for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
        kind = op_kind(event.get("name", "")) if event.get("ph") == "X" else None
        if kind:
            seconds[kind] = seconds.get(kind, 0.0) + event["dur"] * 1e-6 / repeats
    return seconds


def op_kind(name: str) -> str | None:
    """The `OP_KINDS` entry of an XLA:CPU trace event, None for what is not an op."""
    base = name.split(".")[0]
    if base in ("ynn_fusion", "dot", "dot_general", "convolution"):
        return "matmul"
    if "fusion" in base or base.startswith(("wrapped_", "reduce", "add", "multiply",
                                            "select", "exponential", "compare", "convert")):
        return "elementwise"
    if base in ("copy", "transpose", "concatenate", "slice", "dynamic-update-slice",
                "dynamic-slice", "pad"):
        return "copy"
    if base in ("gather", "scatter"):
        return "gather"
    if base in ("sort", "custom-call", "iota", "rng-bit-generator", "all-reduce"):
        return "other"
    return None


def bench_attention(args):
    """One attention call, forward and backward, through each implementation of
    `layers.attention`: their times and how far their outputs and gradients differ.

    Rows are padded three ways in turn (none, a quarter on the left, a quarter on the right), so
    some query rows attend to nothing; `--queries 1` is a decoding step against `--seq` keys.
    """
    import jax
    import jax.numpy as jnp

    from jaxsftdpo.models.layers import (attention_mask_for, einsum_attention, fused_attention,
                                         head_scale)

    b, s, t, d = args.batch, args.seq, args.queries or args.seq, args.head_dim
    kv_heads = args.kv_heads or args.heads
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, args.heads, t, d), dtype)
    k, v = (jax.random.normal(key, (b, kv_heads, s, d), dtype) for key in keys[1:3])
    slots, pad = np.arange(s), s // 4
    valid = np.stack([[slots >= 0, slots >= pad, slots < s - pad][row % 3] for row in range(b)])
    mask = attention_mask_for(jnp.asarray(valid), t, s - t)
    # A query row with nothing to attend (left padding) is never read downstream, so its
    # cotangent is 0 in training; the two paths may give such rows different outputs.
    attends = mask.any(-1)[:, None, :, None]
    cotangent = jax.random.normal(keys[3], q.shape, dtype) * attends.astype(dtype)

    def forward_backward(implementation):
        def run(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: implementation(q, k, v, mask, scale=head_scale(d)),
                               q, k, v)
            return (out, *vjp(cotangent))
        return jax.jit(run)

    print(f"attention forward + backward: batch {b}, {args.heads} query / {kv_heads} key-value "
          f"heads of {d}, {t} queries x {s} keys, {args.dtype}; {jax.devices()[0].device_kind}; "
          f"best of {args.repeats}")
    outputs, seconds = {}, {}
    for name, implementation in (("einsum", einsum_attention), ("fused", fused_attention)):
        run = forward_backward(implementation)
        cudnn = "__cudnn$fmha" in run.lower(q, k, v).compile().as_text()
        outputs[name] = jax.block_until_ready(run(q, k, v))
        seconds[name] = best_time(lambda: jax.block_until_ready(run(q, k, v)), args.repeats)
        finite = all(bool(jnp.isfinite(x).all()) for x in outputs[name])
        print(f"{name:7s} {seconds[name] * 1e3:9.3f} ms   all finite: {finite}"
              f"{'   (cuDNN)' if cudnn else ''}", flush=True)
    def relative(what, fused, einsum):
        fused, einsum = fused.astype(jnp.float32), einsum.astype(jnp.float32)
        if what == "out":  # rows with nothing to attend are left out
            fused, einsum = fused * attends, einsum * attends
        return f"{what} {float(jnp.max(jnp.abs(fused - einsum)) / jnp.max(jnp.abs(einsum))):.1e}"

    differences = ", ".join(relative(*x) for x in zip(("out", "dq", "dk", "dv"),
                                                      outputs["fused"], outputs["einsum"]))
    print(f"einsum / fused time: {seconds['einsum'] / seconds['fused']:.2f}; largest "
          f"|fused - einsum| / largest |einsum|, rows that attend: {differences}")


def add_model_options(parser, gpt2_layers: int, width: int, heads: int):
    """The model (`--shape`, its size), how it computes, and whether to run the reference."""
    parser.add_argument("--shape", choices=["gpt2", "smollm2"], default="gpt2",
                        help="gpt2: --layers/--width/--heads; smollm2: SmolLM2-135M's shapes")
    parser.add_argument("--layers", type=int, default=None,
                        help=f"default: the shape's (gpt2 {gpt2_layers}, smollm2 30)")
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (parameters and optimizer state stay float32)")
    parser.add_argument("--attention", choices=["auto", "einsum", "fused"], default="auto",
                        help="layers.attention's implementation")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="time jaxsftdpo alone: no torch, transformers or peft model")
    parser.set_defaults(gpt2_layers=gpt2_layers)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generate",
                         help="new tokens/s vs transformers generation, greedy and sampled")
    add_model_options(gen, gpt2_layers=6, width=256, heads=8)
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
    add_model_options(train, gpt2_layers=12, width=768, heads=12)
    train.add_argument("--batch", type=int, default=8)
    train.add_argument("--seq", type=int, default=128)
    train.add_argument("--lora-r", type=int, default=8)
    train.add_argument("--repeats", type=int, default=3)
    train.add_argument("--kinds", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    train.add_argument("--precomputed-ref", action=argparse.BooleanOptionalAction, default=True,
                       help="also time DPO with precomputed reference log-probs")
    train.set_defaults(run=bench_train)
    prof = sub.add_parser("profile", help="where a train step's time goes, by op kind")
    add_model_options(prof, gpt2_layers=12, width=768, heads=12)
    prof.add_argument("--kind", choices=["sft", "dpo"], default="sft")
    prof.add_argument("--batch", type=int, default=8)
    prof.add_argument("--seq", type=int, default=128)
    prof.add_argument("--lora-r", type=int, default=8)
    prof.add_argument("--repeats", type=int, default=3)
    prof.set_defaults(run=bench_profile)
    attn = sub.add_parser("attention", help="one attention layer: einsum vs fused path")
    attn.add_argument("--batch", type=int, default=8)
    attn.add_argument("--seq", type=int, default=128, help="keys")
    attn.add_argument("--queries", type=int, default=None, help="default: --seq")
    attn.add_argument("--heads", type=int, default=12)
    attn.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    attn.add_argument("--head-dim", type=int, default=64)
    attn.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    attn.add_argument("--repeats", type=int, default=5)
    attn.set_defaults(run=bench_attention)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
