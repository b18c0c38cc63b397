r"""Look at a task's data: `python -m itjax.data show|stats NAME`.

    python -m itjax.data show quickstart --split train --num 3 --feature_lengths inputs=112,targets=8
    python -m itjax.data stats quickstart --gin_file=quickstart.gin --num_examples 500

`show` prints the first examples of a task (of each of the first --num_tasks tasks of a mixture): the text of every
feature, then its token ids and pieces; chat examples also show which tokens carry loss (targets_loss_mask).
`stats` prints per task the number of examples and, per feature, token-length percentiles (nearest rank:
50/90/95/99) and the maximum, with the share of examples longer than the feature length (truncated in training).
For a mixture, the `all` row pools the tasks' examples (not weighted by mixing rates).

Feature lengths come from --feature_lengths, else from the TASK_FEATURE_LENGTHS macro of the --gin_file(s).
NAME defaults to the MIXTURE_OR_TASK_NAME macro. Gin files may import the modules that register your tasks
(`import my_tasks`), as may --gin_bindings; lengths are counted before trimming, EOS included.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from itjax import cli

PERCENTILES = (50, 90, 95, 99)


def parse_feature_lengths(text: str) -> dict[str, int]:
    """'inputs=256,targets=32' -> {'inputs': 256, 'targets': 32}."""
    from itjax.config import ConfigError

    lengths = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise ConfigError(f"--feature_lengths={text!r}: use name=positive integer pairs, e.g. "
                              "inputs=256,targets=32.")
        lengths[key.strip()] = int(value)
    return lengths


def _leaf_tasks(task_or_mixture) -> list:
    import seqio

    return list(task_or_mixture.tasks) if isinstance(task_or_mixture, seqio.Mixture) else [task_or_mixture]


def _examples(task, split: str, limit: Optional[int]):
    from itjax.config import ConfigError

    if split not in task.splits:
        raise ConfigError(f"task {task.name!r} has no split {split!r} (splits: {', '.join(task.splits)}); "
                          "pass --split.")
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    if limit is not None:
        ds = ds.take(limit)
    return ds.as_numpy_iterator()


def _pieces(vocabulary, ids: Sequence[int]) -> list[str]:
    tokenizer = getattr(vocabulary, "tokenizer", None)  # SentencePiece: the pieces themselves
    if tokenizer is not None and hasattr(tokenizer, "id_to_piece"):
        return [tokenizer.id_to_piece(int(i)) for i in ids]
    return [vocabulary.decode([int(i)]) for i in ids]


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in (text.splitlines() or [""]))


def format_example(task, example: Mapping[str, Any], feature_lengths: Mapping[str, int]) -> str:
    """Text, token ids and pieces of every output feature of one example (plus its other features)."""
    lines = []
    features = [k for k in task.output_features if k in example]
    for key in features:
        vocab = task.output_features[key].vocabulary
        ids = np.asarray(example[key]).tolist()
        text = _text(example[f"{key}_pretokenized"]) if f"{key}_pretokenized" in example else vocab.decode(ids)
        lines.append(f"  {key} (text):\n{_indent(text)}")
    for key in features:
        vocab = task.output_features[key].vocabulary
        ids = np.asarray(example[key]).tolist()
        limit = feature_lengths.get(key)
        note = f", feature length {limit}" + (": TRUNCATED in training" if len(ids) > limit else "") if limit else ""
        lines.append(f"  {key}: {len(ids)} tokens{note}\n    ids:    {ids}\n    pieces: {_pieces(vocab, ids)}")
        mask_key = f"{key}_loss_mask"
        if mask_key in example:
            mask = np.asarray(example[mask_key])
            edges = np.diff(np.concatenate([[0], mask, [0]]))
            spans = [vocab.decode(ids[a:b]) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]
            lines.append(f"    {mask_key}: {int(mask.sum())} of {len(mask)} tokens carry loss: "
                         + " | ".join(repr(s) for s in spans))
    shown = set(features) | {f"{k}_pretokenized" for k in features} | {f"{k}_loss_mask" for k in features}
    others = {k: v for k, v in example.items() if k not in shown}
    if others:
        lines.append("  other features: " + ", ".join(
            f"{k}={_text(v) if isinstance(v, bytes) else np.asarray(v).tolist()}" for k, v in others.items()))
    return "\n".join(lines)


def show(name: str, split: str = "train", num: int = 3, feature_lengths: Mapping[str, int] | None = None,
         num_tasks: int = 3, out=None) -> None:
    """Prints the first `num` examples of the task (of each of the first `num_tasks` tasks of a mixture)."""
    from itjax.data import pipeline

    out = out or sys.stdout
    task_or_mixture = pipeline.get_mixture_or_task(name)
    tasks = _leaf_tasks(task_or_mixture)
    if len(tasks) > 1 or tasks[0] is not task_or_mixture:
        print(f"mixture {name!r}: {len(tasks)} tasks; showing {min(num_tasks, len(tasks))} (--num_tasks)", file=out)
    for task in tasks[:num_tasks]:
        for index, example in enumerate(_examples(task, split, num)):
            print(f"=== {task.name} [{split}] example {index} ===", file=out)
            print(format_example(task, example, feature_lengths or {}), file=out)


def length_stats(lengths: Sequence[int], limit: Optional[int]) -> dict[str, float]:
    """Nearest-rank percentiles, max and the share (%) of lengths above `limit` (None if no limit)."""
    values = np.asarray(lengths)
    if not len(values):
        return {**{f"p{p}": float("nan") for p in PERCENTILES}, "max": float("nan"), "truncated": float("nan")}
    out = {f"p{p}": float(np.percentile(values, p, method="inverted_cdf")) for p in PERCENTILES}
    out["max"] = float(values.max())
    out["truncated"] = float(100.0 * np.mean(values > limit)) if limit else float("nan")
    return out


def collect_lengths(name: str, split: str = "train", num_examples: Optional[int] = None
                    ) -> dict[str, dict[str, list[int]]]:
    """{task: {feature: token lengths}} over the first `num_examples` examples of every task (all if None)."""
    from itjax.data import pipeline

    result = {}
    for task in _leaf_tasks(pipeline.get_mixture_or_task(name)):
        features = list(task.output_features)
        lengths: dict[str, list[int]] = {k: [] for k in features}
        count = 0
        for example in _examples(task, split, num_examples):
            count += 1
            for key in features:
                if key in example:
                    lengths[key].append(len(example[key]))
        result[task.name] = {"__count__": [count], **lengths}
    return result


def format_stats(per_task: Mapping[str, Mapping[str, list[int]]], feature_lengths: Mapping[str, int]) -> str:
    """The stats table: one line per (task, feature), then `all` (pooled) when there are several tasks."""
    rows = []
    tables = dict(per_task)
    if len(tables) > 1:
        pooled: dict[str, list[int]] = {"__count__": [sum(t["__count__"][0] for t in tables.values())]}
        for table in tables.values():
            for key, values in table.items():
                if key != "__count__":
                    pooled.setdefault(key, []).extend(values)
        tables["all"] = pooled
    width = max(len(n) for n in tables) + 2
    header = (f"{'task':<{width}}{'examples':>9}  {'feature':<10}" + "".join(f"{f'p{p}':>7}" for p in PERCENTILES)
              + f"{'max':>7}{'truncated':>11}")
    rows += [header, "-" * len(header)]
    for name, table in tables.items():
        if name == "all":
            rows.append("-" * len(header))
        count = table["__count__"][0]
        first = True
        for key, values in table.items():
            if key == "__count__":
                continue
            s = length_stats(values, feature_lengths.get(key))
            lead = f"{name:<{width}}{count:>9}" if first else " " * (width + 9)
            trunc = "n/a" if np.isnan(s["truncated"]) else f"{s['truncated']:.1f}%"
            cells = "".join("      -" if np.isnan(s[f"p{p}"]) else f"{s[f'p{p}']:>7.0f}" for p in PERCENTILES)
            rows.append(f"{lead}  {key:<10}{cells}{'-' if np.isnan(s['max']) else int(s['max']):>7}{trunc:>11}")
            first = False
    return "\n".join(rows)


def stats(name: str, split: str = "train", num_examples: Optional[int] = None,
          feature_lengths: Mapping[str, int] | None = None, out=None) -> dict:
    """Prints (and returns) the per-task example counts and token-length statistics."""
    out = out or sys.stdout
    per_task = collect_lengths(name, split, num_examples)
    lengths = dict(feature_lengths or {})
    cap = f", first {num_examples} examples per task" if num_examples else ""
    source = f"feature lengths {lengths}" if lengths else "no feature lengths (pass --feature_lengths or --gin_file)"
    print(f"{name} [{split}]: {len(per_task)} task(s){cap}; {source}", file=out)
    print(format_stats(per_task, lengths), file=out)
    return per_task


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m itjax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("show", "stats"):
        p = sub.add_parser(command)
        p.add_argument("name", nargs="?", default=None, help="task or mixture (default: MIXTURE_OR_TASK_NAME)")
        p.add_argument("--split", default="train")
        p.add_argument("--gin_file", action="append", default=[])
        p.add_argument("--gin_bindings", action="append", default=[])
        p.add_argument("--gin_search_paths", default="")
        p.add_argument("--feature_lengths", default=None, help="e.g. inputs=256,targets=32")
        cli.add_verbose_flag(p)
        if command == "show":
            p.add_argument("--num", type=int, default=3, help="examples per task")
            p.add_argument("--num_tasks", type=int, default=3, help="tasks of a mixture to show")
        else:
            p.add_argument("--num_examples", type=int, default=None, help="per task (default: all)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from itjax import config as config_lib

    bindings, rest = config_lib.split_gin_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(rest)
    cli.start(args.verbose)
    try:
        name, lengths = args.name, None
        if args.gin_file or args.gin_bindings or bindings:
            import itjax.training  # noqa: F401  (registers the configurables run gin files bind)

            config_lib.parse_gin(args.gin_file, list(args.gin_bindings) + bindings,
                                 [p for p in args.gin_search_paths.split(",") if p])
            name = name or config_lib.macro_value("MIXTURE_OR_TASK_NAME")
            lengths = config_lib.macro_value("TASK_FEATURE_LENGTHS")
        if args.feature_lengths:
            lengths = parse_feature_lengths(args.feature_lengths)
        if not name:
            raise config_lib.ConfigError("name a task or mixture (or pass a --gin_file that sets "
                                         "MIXTURE_OR_TASK_NAME).")
        if args.command == "show":
            show(name, args.split, args.num, lengths, args.num_tasks)
        else:
            stats(name, args.split, args.num_examples, lengths)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
