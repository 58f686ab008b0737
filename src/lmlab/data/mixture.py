"""Sources → one training list and one held-out list: de-duplicate, cap, split and weight each source.

    train, val, summary = load_sources(specs, read, what="preference data", unit="pair",
                                       val_fraction=0.05, seed=0, on_error="skip")

`read(spec, summary, on_error)` gives one source's valid items in file order (anything with `where`, `group`
and a content `key()`). Each source then loses its exact duplicates (of any earlier item, of any source), is
capped at `max_examples` (a seeded sample, kept in file order), holds out round(val_fraction × its items) (at
least 1; `split_held_out`), whole groups in the order of hash(seed, group), so its split does not change when
other sources are added or reordered, and has its training part weighted (`SourceSpec.weight`). Held-out items
are never weighted.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError, DataError
from .records import ON_ERROR, DataSummary, SourceSpec


def load_sources(sources, read: Callable[[SourceSpec, DataSummary, str], list], *, what: str, unit: str,
                 val_fraction: float, seed: int, on_error: str = "skip", dedup: bool = True,
                 kinds: str = "a file or 'hf:NAME'", hint: str = "") -> tuple[list, list, DataSummary]:
    """(train, held out, summary) of `sources` (paths or SourceSpecs) as the module docstring says. DataError
    '`what`: no valid training `unit` in …' (the commonest drop reasons, then `hint`) when no item trains."""
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(s)
             for s in (sources if isinstance(sources, list | tuple) else [sources])]
    if not specs:
        raise DataError(f"no {what} source given; pass {kinds}")
    if on_error not in ON_ERROR:
        raise ConfigError(f"finetune.on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    summary, seen, train, val = DataSummary(), set(), [], []
    for spec in specs:
        items = read(spec, summary, on_error)
        if dedup:
            items = _drop_duplicates(items, spec, seen, summary)
        items = _cap(items, spec, seed, summary)
        st = summary.stats(spec.path)
        st.kept = len(items)
        tr, va = split_held_out(items, lambda x: x.group or x.key(), val_fraction, seed)
        tr = _weight(tr, spec.weight, seed)
        st.train, st.val = len(tr), len(va)
        train += tr
        val += va
    if not train:
        raise DataError(f"{what}: no valid training {unit} in {', '.join(s.path for s in specs)}"
                        + summary.why_dropped() + hint)
    summary.train, summary.val = len(train), len(val)
    summary.split = split_line(val_fraction, sum(s.kept for s in summary.sources.values()), len(val))
    return train, val, summary


def split_hash(group: str, seed: int) -> float:
    """A deterministic hash of (seed, group) in [0, 1): the order in which groups are held out."""
    h = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def in_val(group: str, val_fraction: float, seed: int) -> bool:
    """True when split_hash(group, seed) < val_fraction: the held-out share of an unbounded stream of groups
    (`split_held_out` holds out an exact count from a finite list)."""
    return val_fraction > 0 and split_hash(group, seed) < val_fraction


def held_out_count(n: int, val_fraction: float) -> int:
    """How many of `n` examples are held out: round(val_fraction × n), at least 1 when val_fraction > 0 and n ≥ 2,
    never all of them."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(val_fraction * n)))


def split_held_out(items: list, group_of, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out), each in the order of `items`. Groups (`group_of(item)`: an oasst tree, a stdlib module)
    are taken whole, in the order of split_hash(group, seed), until they hold `held_out_count(len(items))` items
    (one group may overshoot it; the last group always trains). Which examples a source holds out depends only
    on that source's own examples, the fraction and the seed."""
    k = held_out_count(len(items), val_fraction)
    if k == 0:
        return list(items), []
    sizes = Counter(group_of(x) for x in items)
    held, n_held = set(), 0
    for g in sorted(sizes, key=lambda g: (split_hash(g, seed), g))[:-1]:
        if n_held >= k:
            break
        held.add(g)
        n_held += sizes[g]
    return [x for x in items if group_of(x) not in held], [x for x in items if group_of(x) in held]


def split_line(val_fraction: float, n: int, n_val: int) -> str:
    """How the held-out split was made, for the data summary."""
    if val_fraction <= 0:
        return f"split: none held out (data.val_fraction=0); all {n:,} train"
    return (f"split: {n_val:,} of {n:,} held out (data.val_fraction={val_fraction:g}: round(fraction × n) of each "
            f"source, at least 1, whole groups, chosen by hash of the split seed)")


def _drop_duplicates(items: list, spec: SourceSpec, seen: set[str], summary: DataSummary) -> list:
    out = []
    for x in items:
        k = x.key()
        if k in seen:
            summary.drop(spec.path, "duplicate", x.where)
        else:
            seen.add(k)
            out.append(x)
    return out


def _cap(items: list, spec: SourceSpec, seed: int, summary: DataSummary) -> list:
    """At most spec.max_examples items: a sample drawn with the seed, in file order."""
    if spec.max_examples is None or len(items) <= spec.max_examples:
        return items
    keep = np.sort(np.random.default_rng([seed, 2]).permutation(len(items))[: spec.max_examples])
    st = summary.stats(spec.path)
    st.dropped["over max_examples"] += len(items) - spec.max_examples
    st.first_error.setdefault("over max_examples", f"{spec.path} (cap {spec.max_examples})")
    return [items[i] for i in keep]


def _weight(items: list, weight: float, seed: int) -> list:
    """Repeat each item int(weight) times, plus a seeded random fraction of them once more."""
    if weight == 1.0 or not items:
        return items
    whole, frac = int(weight), weight - int(weight)
    out = items * whole
    if frac > 0:
        n = round(frac * len(items))
        pick = np.sort(np.random.default_rng([seed, 3]).permutation(len(items))[:n])
        out += [items[i] for i in pick]
    return out
