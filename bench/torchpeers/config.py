"""Reads a Strata experiment config (the YAML subset Strata's own configs use: nested
`key: value` mappings, `#` comments, scalars) into the few fields the peers need.

Invariant: a field the peers cannot honour (llama, tied embeddings, random data) is refused
with a one-line error naming it, so a peer never silently trains a different model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


class ConfigError(ValueError):
    """A config the peers cannot read or cannot reproduce."""


def _scalar(text: str):
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text.strip("\"'")


def parse_yaml_subset(text: str, source: str = "<config>") -> dict:
    """Parses nested block mappings of scalars; anything else (lists, flow style) is refused."""
    root: dict = {}
    stack = [(-1, root)]
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        m = re.fullmatch(r"([A-Za-z_][\w.]*):(?:\s+(.*))?", line.strip())
        if not m or (m.group(2) or "").startswith(("{", "[", "-", "|", ">")):
            raise ConfigError(f"{source}:{lineno}: unsupported YAML `{line.strip()}`; "
                              "fix: use one `key: value` per line (the style of configs/)")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        key, value = m.group(1), m.group(2)
        if value is None:
            parent[key] = {}
            stack.append((indent, parent[key]))
        else:
            parent[key] = _scalar(value)
    return root


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    seq_len: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    activation: str = "gelu"
    norm_eps: float = 1e-5

    @property
    def params(self) -> int:
        d, f, L, V, s = self.d_model, self.d_ff, self.n_layers, self.vocab, self.seq_len
        block = 4 * d * d + 2 * d * f + 3 * d + d + f + d + 4 * d  # weights, biases, 2 LNs
        return V * d + s * d + L * block + 2 * d + d * V


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int
    lr: float
    seed: int
    data: str  # absolute path of the text file
    warmup_steps: int
    lr_schedule: str
    min_lr: float | None
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float | None
    threads: int

    def lr_at(self, step: int) -> float:
        """Strata's schedule (engine/src/trainer.rs `lr_at`): linear warm-up, then cosine."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - min(self.warmup_steps, step)) / span, 1.0)
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class Parallel:
    pp: int
    tp: int
    dp: int
    microbatches: int
    micro_batch_size: int
    schedule: str
    virtual_stages: int

    @property
    def world(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def global_batch(self) -> int:
        return self.dp * self.microbatches * self.micro_batch_size


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    vocab_spec: object  # `auto` or an int, as written
    shape_partial: dict
    parallel: Parallel
    train: Train
    output_dir: str


def _get(section: dict, key: str, source: str, default=dataclasses.MISSING):
    if key in section:
        return section[key]
    if default is dataclasses.MISSING:
        raise ConfigError(f"{source}: missing `{key}`; fix: add it (see configs/README.md)")
    return default


def load(path: str) -> Config:
    """Loads `path`; `train.data` is resolved against the config's directory, as Strata does."""
    with open(path, encoding="utf-8") as f:
        return loads(f.read(), path)


def loads(text: str, path: str) -> Config:
    """Parses config `text` read from `path` (a checkpoint's resolved config holds absolute
    paths, so any `path` in its directory will do)."""
    doc = parse_yaml_subset(text, path)
    model, par, tr = doc.get("model", {}), doc.get("parallel", {}), doc.get("train", {})
    if model.get("arch", "gpt") != "gpt":
        raise ConfigError(f"{path}: model.arch `{model['arch']}`: the peers build GPT only")
    if model.get("tie_embeddings", False):
        raise ConfigError(f"{path}: model.tie_embeddings: the peers build an untied head")
    if model.get("n_kv_heads", model.get("n_heads")) != model.get("n_heads"):
        raise ConfigError(f"{path}: model.n_kv_heads: GPT needs n_kv_heads = n_heads")
    data = _get(tr, "data", path)
    if data == "random":
        raise ConfigError(f"{path}: train.data `random`: the peers train on a text file")
    data = os.path.join(os.path.dirname(os.path.abspath(path)), data)
    clip = tr.get("grad_clip")
    train = Train(
        steps=_get(tr, "steps", path), lr=float(_get(tr, "lr", path)), seed=tr.get("seed", 0),
        data=os.path.normpath(data), warmup_steps=tr.get("warmup_steps", 0),
        lr_schedule=tr.get("lr_schedule", "constant"), min_lr=tr.get("min_lr"),
        weight_decay=float(tr.get("weight_decay", 0.0)), beta1=float(tr.get("beta1", 0.9)),
        beta2=float(tr.get("beta2", 0.95)), grad_clip=None if clip is None else float(clip),
        threads=tr.get("threads", 1))
    parallel = Parallel(
        pp=_get(par, "pp", path), tp=par.get("tp", 1), dp=par.get("dp", 1),
        microbatches=_get(par, "microbatches", path),
        micro_batch_size=_get(par, "micro_batch_size", path),
        schedule=par.get("schedule", "gpipe"), virtual_stages=par.get("virtual_stages", 1))
    shape = {k: _get(model, k, path) for k in ("seq_len", "d_model", "n_heads", "n_layers", "d_ff")}
    shape["activation"] = model.get("activation", "gelu")
    shape["norm_eps"] = float(model.get("norm_eps", 1e-5))
    return Config(path=path, vocab_spec=model.get("vocab", "auto"), shape_partial=shape,
                  parallel=parallel, train=train,
                  output_dir=doc.get("output", {}).get("dir", ""))


def shape_of(cfg: Config, data_vocab: int) -> Shape:
    """The model shape, with `vocab: auto` resolved to the data's character count."""
    vocab = data_vocab if cfg.vocab_spec == "auto" else int(cfg.vocab_spec)
    if vocab < data_vocab:
        raise ConfigError(f"{cfg.path}: model.vocab {vocab} < {data_vocab} characters in the data")
    return Shape(vocab=vocab, **cfg.shape_partial)
