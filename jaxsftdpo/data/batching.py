"""Examples -> token ids with loss masks -> fixed-shape numpy batches.

Conventions:
- `loss_mask[t]` is True when token t is a training target (predicted from position t-1): the
  completion's tokens and the end-of-text token after it, never the prompt.
- Too long sequences lose tokens from the LEFT of the prompt (the end of a prompt, next to the
  answer, matters most); a completion that does not fit with at least one prompt token is dropped.
  Both are counted in the returned `Tokenized`; `strict=True` raises a UserError instead.
- Batches are padded on the right with the pad token to the smallest length bucket that holds the
  longest row, so a jitted step compiles once per bucket.
- Training epochs: order = `np.random.default_rng((*stream, epoch)).permutation(n)`, the stream
  being the trainer's (seed, stage), the last partial batch dropped. Evaluation (`shuffle=False, drop_last=False`): every example in file order, the
  last batch filled up to `batch_size` with empty rows whose masks are all False.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from jaxsftdpo.errors import UserError

SMALLEST_BUCKET = 64


class Sequence(NamedTuple):
    ids: np.ndarray        # int32 [n]
    loss_mask: np.ndarray  # bool [n]


class PreferencePair(NamedTuple):
    chosen: Sequence
    rejected: Sequence


class Tokenized(NamedTuple):
    items: list      # Sequence, PreferencePair, or int32 prompt ids, one per kept example
    truncated: int   # examples whose prompt was cut from the left
    dropped: int     # examples left out because their completion alone did not fit


# ---- tokenization ---------------------------------------------------------------------------

def tokenize_sft(examples: list[dict], tokenizer, max_length: int, *,
                 strict: bool = False, append_eos: bool = True) -> Tokenized:
    """`{"prompt", "completion"}` examples -> `Sequence`s of prompt + completion (+ eos).

    Cloze tasks leave eos out: their completion is the answer alone, as the study scores it; so
    does an example whose chat template already closed the turn with eos (`"closed"`).
    """
    def encode(example):
        return (tokenizer.encode(example["prompt"]),
                [tokenizer.encode(example["completion"]) + _end(example, tokenizer, append_eos)])

    def build(prefix, prompt, completions):
        return _sequence(prefix, prompt, completions[0])

    return _tokenize(examples, tokenizer, max_length, strict, encode, build)


def tokenize_preferences(pairs: list[dict], tokenizer, max_length: int, *,
                         strict: bool = False, append_eos: bool = True) -> Tokenized:
    """`{"prompt", "chosen", "rejected"}` -> `PreferencePair`s; both sides keep the same prompt
    tokens (cut to fit the longer answer), so their log-probs are conditioned alike."""
    def encode(pair):
        end = _end(pair, tokenizer, append_eos)
        return (tokenizer.encode(pair["prompt"]),
                [tokenizer.encode(pair[side]) + end for side in ("chosen", "rejected")])

    def build(prefix, prompt, completions):
        return PreferencePair(*(_sequence(prefix, prompt, c) for c in completions))

    return _tokenize(pairs, tokenizer, max_length, strict, encode, build)


def _end(example: dict, tokenizer, append_eos: bool) -> list[int]:
    return [tokenizer.eos_token_id] if append_eos and not example.get("closed") else []


def tokenize_prompts(prompts: list[str], tokenizer, max_length: int) -> Tokenized:
    """Prompts alone (for scoring the next token), cut from the left to `max_length` tokens."""
    prefix = list(tokenizer.prefix_ids)
    items, truncated = [], 0
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        keep = max_length - len(prefix)
        if len(ids) > keep:
            ids, truncated = ids[len(ids) - keep:], truncated + 1
        items.append(np.asarray(prefix + ids, np.int32))
    return Tokenized(items, truncated, 0)


def first_token_ids(tokenizer, completions: list[str]) -> np.ndarray:
    """First token of each candidate completion; they must differ to be told apart by one logit."""
    firsts = [tokenizer.encode(c)[:1] for c in completions]
    if any(not f for f in firsts) or len({f[0] for f in firsts}) < len(firsts):
        raise UserError(f"candidate completions {completions!r} must each start with a "
                        "different token; reword them")
    return np.asarray([f[0] for f in firsts], np.int32)


def _tokenize(examples, tokenizer, max_length, strict, encode, build) -> Tokenized:
    prefix = list(tokenizer.prefix_ids)
    items, truncated, dropped = [], 0, 0
    for index, example in enumerate(examples):
        prompt, completions = encode(example)
        answer_length = max(len(c) for c in completions)
        length = len(prefix) + len(prompt) + answer_length
        if length > max_length:
            if strict:
                raise UserError(f"example {index}: sequence of {length} tokens is longer than "
                                f"the limit {max_length}; set data.truncate=true to cut prompts "
                                f"from the left to fit, raise data.max_length (at most the "
                                f"model's context length) or shorten the examples")
            keep = max_length - len(prefix) - answer_length
            if keep < 1:
                dropped += 1
                continue
            prompt, truncated = prompt[len(prompt) - keep:], truncated + 1
        items.append(build(prefix, prompt, completions))
    if examples and not items:
        raise UserError(f"every one of the {len(examples)} examples has a completion too long "
                        f"for max_length={max_length}; raise data.max_length or shorten them")
    return Tokenized(items, truncated, dropped)


def _sequence(prefix: list[int], prompt: list[int], completion: list[int]) -> Sequence:
    ids = np.asarray(prefix + prompt + completion, np.int32)
    loss_mask = np.zeros(len(ids), bool)
    loss_mask[len(prefix) + len(prompt):] = True
    return Sequence(ids, loss_mask)


def completion_tokens(sequence: Sequence) -> int:
    """The tokens of `sequence` a loss scores: its loss mask but the first position, which no
    logit predicts."""
    return int(sequence.loss_mask[1:].sum())


def scored_tokens_bound(items: list) -> int:
    """The most completion tokens any sequence of `items` (`Sequence`s or `PreferencePair`s)
    scores, rounded up to a multiple of 8 for even matmul shapes: the train step computes
    logits at that many positions per row instead of all of them."""
    def scored(sequence: Sequence) -> int:
        return int(sequence.loss_mask.sum())
    most = max((max(scored(item.chosen), scored(item.rejected))
                if isinstance(item, PreferencePair) else scored(item)) for item in items)
    return -(-max(most, 1) // 8) * 8


# ---- lengths and padding --------------------------------------------------------------------

def default_buckets(max_length: int) -> tuple[int, ...]:
    """64, 128, 256, ... below `max_length`, then `max_length` itself."""
    buckets, size = [], SMALLEST_BUCKET
    while size < max_length:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_length,)


def bucket_length(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `n` tokens."""
    fitting = [b for b in buckets if b >= n]
    if not fitting:
        raise ValueError(f"{n} tokens exceed the largest bucket {max(buckets)}")
    return min(fitting)


def pad_sequences(rows: list[np.ndarray], length: int, pad_id: int, batch_size: int,
                  side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """`(ids, attention_mask)` `[batch_size, length]`; rows beyond `len(rows)` are all padding."""
    ids = _place(rows, length, batch_size, pad_id, np.int32, side)
    mask = _place([np.ones(len(r), bool) for r in rows], length, batch_size, False, bool, side)
    return ids, mask


def _place(rows, length, batch_size, fill, dtype, side) -> np.ndarray:
    out = np.full((batch_size, length), fill, dtype)
    for i, row in enumerate(rows):
        if side == "right":
            out[i, :len(row)] = row
        else:
            out[i, length - len(row):] = row
    return out


def sft_batch(items: list[Sequence], batch_size: int, pad_id: int,
              buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
    length = bucket_length(max(len(s.ids) for s in items), buckets)
    return _padded(items, "", length, pad_id, batch_size)


def preference_batch(items: list[PreferencePair], batch_size: int, pad_id: int,
                     buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
    length = bucket_length(max(len(s.ids) for p in items for s in p), buckets)
    return {**_padded([p.chosen for p in items], "chosen_", length, pad_id, batch_size),
            **_padded([p.rejected for p in items], "rejected_", length, pad_id, batch_size)}


def prompt_batch(prompts: list[np.ndarray], batch_size: int, pad_id: int,
                 buckets: tuple[int, ...], side: str = "left") -> dict[str, np.ndarray]:
    """Prompts padded on `side`, with `last_index`: the column of each row's last prompt token,
    where the logits predict the first completion token (0 for empty filler rows)."""
    length = bucket_length(max(len(p) for p in prompts), buckets)
    ids, mask = pad_sequences(prompts, length, pad_id, batch_size, side)
    last_index = np.zeros(batch_size, np.int32)
    for i, prompt in enumerate(prompts):
        last_index[i] = len(prompt) - 1 if side == "right" else length - 1
    return {"input_ids": ids, "attention_mask": mask, "last_index": last_index}


def _padded(items: list[Sequence], key_prefix: str, length: int, pad_id: int,
            batch_size: int) -> dict[str, np.ndarray]:
    ids, attention_mask = pad_sequences([s.ids for s in items], length, pad_id, batch_size)
    loss_mask = _place([s.loss_mask for s in items], length, batch_size, False, bool, "right")
    return {f"{key_prefix}input_ids": ids, f"{key_prefix}attention_mask": attention_mask,
            f"{key_prefix}loss_mask": loss_mask}


# ---- epochs ---------------------------------------------------------------------------------

def num_batches(n_examples: int, batch_size: int, drop_last: bool = True) -> int:
    return n_examples // batch_size if drop_last else -(-n_examples // batch_size)


def epoch_order(n_examples: int, stream: tuple[int, ...], epoch: int) -> np.ndarray:
    """The example order of an epoch: a pure function of (*stream, epoch), where `stream`
    names whose order it is, e.g. (seed, stage)."""
    return np.random.default_rng((*stream, epoch)).permutation(n_examples)


def batches_for_epoch(items: list, batch_size: int, pad_id: int, buckets: tuple[int, ...], *,
                      stream: tuple[int, ...] = (0,), epoch: int = 0, start: int = 0,
                      shuffle: bool = True,
                      drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Batches `start, start+1, ...` of an epoch of `Sequence`s or `PreferencePair`s.

    Skipping the first `start` batches costs nothing, so a resumed run continues mid-epoch.
    """
    if not items:
        return
    order = epoch_order(len(items), stream, epoch) if shuffle else np.arange(len(items))
    collate = preference_batch if isinstance(items[0], PreferencePair) else sft_batch
    for b in range(start, num_batches(len(items), batch_size, drop_last)):
        chosen = order[b * batch_size:(b + 1) * batch_size]
        batch = collate([items[i] for i in chosen], batch_size, pad_id, buckets)
        # Which example each row holds (-1 for filler rows), e.g. to look up precomputed values.
        batch["index"] = np.full(batch_size, -1, np.int32)
        batch["index"][:len(chosen)] = chosen
        yield batch
