"""chrF as the CS224N default project scores sonnets: sacrebleu `CHRF()` with its defaults.

Character n-grams up to 6, no word n-grams, beta 2, case-sensitive, whitespace ignored; one
corpus-level score, generated and reference texts paired by position after cutting both lists to
the shorter length.
"""

from __future__ import annotations

from sacrebleu.metrics import CHRF


def corpus_chrf(generated: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100) of `generated[i]` against `references[i]`."""
    n = min(len(generated), len(references))
    return float(CHRF().corpus_score(list(generated[:n]), [list(references[:n])]).score)


def sentence_chrf(generated: str, reference: str) -> float:
    """chrF (0-100) of one text against one reference."""
    return float(CHRF().sentence_score(generated, [reference]).score)


def signature() -> str:
    """sacrebleu's signature of the metric, e.g. `nrefs:1|case:mixed|eff:yes|nc:6|nw:0|...`."""
    metric = CHRF()
    metric.corpus_score(["a"], [["a"]])
    return str(metric.get_signature())
