"""A model under training seen the way tasks use it: next-token logits after a prompt, and text
continuations sampled from it.

Tasks never see graphdefs, shardings or meshes; the trainer and `evaluate` hand them a `Policy`.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxsftdpo import sharding, steps
from jaxsftdpo.data import batching
from jaxsftdpo.generate import generate


class Policy:
    def __init__(self, graphdef, trainable, frozen, tokenizer, mesh, max_length: int):
        self.graphdef, self.trainable, self.frozen = graphdef, trainable, frozen
        self.tokenizer, self.mesh, self.max_length = tokenizer, mesh, max_length
        self.buckets = batching.default_buckets(max_length)

    def batch_size(self, wanted: int) -> int:
        """`wanted` rounded up to a multiple of the data-parallel devices."""
        n = sharding.batch_divisor(self.mesh)
        return -(-wanted // n) * n

    def last_token_logits(self, batch: dict) -> np.ndarray:
        """`[B, V]` logits at each row's `last_index` of a `batching.prompt_batch`."""
        with sharding.tracing_on(self.mesh):
            logits = steps.last_token_logits(self.graphdef, self.trainable, self.frozen,
                                             sharding.place_batch(batch, self.mesh))
        return sharding.to_host(logits)

    def prompt_logits(self, prompts: list[np.ndarray], batch_size: int) -> np.ndarray:
        """`[len(prompts), V]` next-token logits after each tokenized prompt.

        The prompts go through in order of length, so that each batch pads to the bucket of
        prompts like its own (on the Quora dev pairs a third less padding than in file order).
        """
        size = self.batch_size(batch_size)
        order = np.argsort([len(p) for p in prompts], kind="stable")
        out = []
        for start in range(0, len(prompts), size):
            rows = [prompts[i] for i in order[start:start + size]]
            batch = batching.prompt_batch(rows, size, self.tokenizer.pad_token_id, self.buckets)
            out.append(self.last_token_logits(batch)[:len(rows)])
        if not out:
            return np.zeros((0, 0), np.float32)
        logits = np.empty((len(prompts), out[0].shape[-1]), np.float32)
        logits[order] = np.concatenate(out)
        return logits

    def sequence_logps(self, items: list, batch_size: int):
        """Summed completion log-probs of tokenized items, in their order: `[N]` for
        `batching.Sequence`s, `(chosen [N], rejected [N])` for `batching.PreferencePair`s."""
        pairs = bool(items) and isinstance(items[0], batching.PreferencePair)
        out = np.zeros((2 if pairs else 1, len(items)), np.float32)
        score = steps.pair_logps if pairs else steps.sequence_logps
        # The bound the train step uses on the same items: the same computation, row by row,
        # so precomputed reference log-probs equal the policy's at the hand-off exactly.
        scored_tokens = batching.scored_tokens_bound(items) if items else None
        for batch in batching.batches_for_epoch(items, self.batch_size(batch_size),
                                                self.tokenizer.pad_token_id, self.buckets,
                                                shuffle=False, drop_last=False):
            index = batch.pop("index")
            keep = index >= 0
            with sharding.tracing_on(self.mesh):
                logps = score(self.graphdef, self.trainable, self.frozen,
                              sharding.place_batch(batch, self.mesh), scored_tokens)
            for row, values in zip(out, logps if pairs else (logps,)):
                row[index[keep]] = sharding.to_host(values)[keep]
        return (out[0], out[1]) if pairs else out[0]

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int | None = None, seed: int = 0,
                 batch_size: int = 32) -> list[str]:
        """One continuation per prompt (text after the prompt, up to the end-of-text token)."""
        model = nnx.merge(self.graphdef, self.trainable, self.frozen)
        eos = self.tokenizer.eos_token_id
        encoded = [np.asarray(self.tokenizer.encode(p), np.int32) for p in prompts]
        texts = []
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start:start + batch_size]
            ids, mask = batching.pad_sequences(rows, max(len(r) for r in rows),
                                               self.tokenizer.pad_token_id, len(rows), "left")
            new = generate(model, ids, mask, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_k=top_k,
                           eos_token_id=eos, seed=seed + start)
            for row in new:
                ends = np.flatnonzero(row == eos)
                texts.append(self.tokenizer.decode(row[:ends[0]] if ends.size else row))
        return texts
