"""Builds the quickstart data: the synthetic SuperNI task files and their SentencePiece vocabulary.

    python scripts/make_quickstart_data.py [--out_dir tasks/data/quickstart] [--seed 0] [--vocab_size 640]

Writes `<out_dir>/task9*.json` (itjax.data.synthetic), then trains a BPE SentencePiece model on text the
project generates (the rendered Tk-Instruct prompts and outputs of the train split, plus every word form) with
the T5 id conventions (pad=0, eos=1, unk=2, no bos) into `<out_dir>/spm.model` / `spm.vocab`. Everything is
deterministic (fixed seed, one thread, no sentence sampling), so re-running reproduces the files byte for byte.
BPE, not unigram: on this small, highly repetitive corpus the unigram trainer finds too few seed pieces
(at most ~300, splitting even 'Input' and 'Output'), while BPE learns every prompt word and word form.
It fails if a word form of the pools is not a single piece, and prints token-length statistics (EOS included)
to choose TASK_FEATURE_LENGTHS.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from itjax.data import superni, synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "tasks", "data", "quickstart")
FORM_REPEATS = 50  # extra occurrences of every word form, so each one is frequent enough to be a piece


def corpus_sentences(tasks: dict[str, dict]) -> list[str]:
    """Lines of training text: every train-split prompt (split at newlines), every acceptable output, and
    each word form / digit FORM_REPEATS times."""
    lines = []
    for task in tasks.values():
        for instance in synthetic.split_instances(task["Instances"], "train"):
            prompt = superni.encode_tk_instruct(task, instance)
            lines.extend(line.strip() for line in prompt.split("\n") if line.strip())
            lines.extend(instance["output"])
    forms = synthetic.word_forms() + list(synthetic.DIGITS) + list(synthetic.NUMBER_NAMES)
    lines.extend(" ".join(forms) for _ in range(FORM_REPEATS))
    return lines


def train_vocabulary(sentences: list[str], model_prefix: str, vocab_size: int) -> None:
    """Trains the model in memory and writes `<model_prefix>.model` / `.vocab` (piece TAB score lines)."""
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        input_sentence_size=len(sentences) + 1,  # use every sentence, no sampling
        shuffle_input_sentence=False,
        # Numbers are digit sequences ('5416' -> '▁5' '4' '1' '6'; parity = parity of the last piece) and a
        # digit after a space is one piece, like the words ('3 8' -> '▁3' '▁8').
        split_digits=True,
        user_defined_symbols=[f"\u2581{d}" for d in synthetic.DIGITS],
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    proto.trainer_spec.model_prefix = os.path.basename(model_prefix)  # no local paths in committed files
    with open(model_prefix + ".model", "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))
    with open(model_prefix + ".vocab", "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{piece.piece}\t{piece.score:g}\n" for piece in proto.pieces)


def check_single_pieces(processor: spm.SentencePieceProcessor) -> None:
    forms = synthetic.word_forms() + list(synthetic.DIGITS)
    split = {f: processor.encode(f, out_type=str) for f in forms if len(processor.encode(f)) != 1}
    if split:
        raise SystemExit(f"These word forms are not single pieces: {split}. Raise --vocab_size and re-run.")


def length_stats(processor: spm.SentencePieceProcessor, tasks: dict[str, dict]) -> None:
    """Prints max / p50 / p99 token lengths (EOS included) of rendered inputs and of targets, all splits."""
    inputs, targets = [], []
    for task in tasks.values():
        for instance in task["Instances"]:
            inputs.append(len(processor.encode(superni.encode_tk_instruct(task, instance))) + 1)
            targets.append(len(processor.encode(instance["output"][0])) + 1)
    for name, lengths in (("inputs", inputs), ("targets", targets)):
        p50, p99 = np.percentile(lengths, [50, 99])
        print(f"{name:8s} tokens (with EOS): max {max(lengths)}  p50 {p50:.0f}  p99 {p99:.0f}  n={len(lengths)}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=synthetic.QUICKSTART_SEED)
    parser.add_argument("--vocab_size", type=int, default=640)
    args = parser.parse_args(argv)

    os.makedirs(args.out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(args.out_dir, "task*.json")):  # tasks renamed or removed since
        os.remove(stale)
    paths = synthetic.write_tasks(args.out_dir, args.seed)
    print(f"wrote {len(paths)} task files to {args.out_dir}")

    tasks = {os.path.splitext(os.path.basename(p))[0]: superni.load_task(p) for p in paths}
    model_prefix = os.path.join(args.out_dir, "spm")
    train_vocabulary(corpus_sentences(tasks), model_prefix, args.vocab_size)
    processor = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    check_single_pieces(processor)
    print(f"wrote {model_prefix}.model / .vocab: {processor.get_piece_size()} pieces")
    length_stats(processor, tasks)
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(args.out_dir, "*")))
    print(f"total size of {args.out_dir}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
