"""Checks itjax's BBH prompts and scoring against the official code-davinci-002 outputs of a BIG-Bench-Hard checkout.

    python scripts/check_bbh_prompts.py /data/BIG-Bench-Hard

The repository's `code-davinci-002-outputs/code-davinci-002-{cot,direct}/<task>_few_shot_template_0-255000.json`
files record, for every example, the prompt the paper sent to the model, its generation and the target, and
`..._eval_metrics.jsonl` the accuracy. For every task this prints how many prompts itjax builds identically
(`FewShotPrompt.cot_prompt` / `direct_prompt` from the public prompt files) and the accuracy that itjax's answer
extraction and exact match (`itjax.metrics.bbh_answer`, `strict_exact_match`) give on the official generations
next to the published one. Needs no model; reads only the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from itjax.metrics import bbh_answer, strict_exact_match
from itjax.tasks import bbh

OUTPUTS = "code-davinci-002-outputs"


def check(data_dir: str) -> int:
    """Prints one line per (task, style); returns the number of lines whose accuracy differs from the published."""
    differing_accuracy = 0
    totals = {"prompts": 0, "identical": 0}
    for name in bbh.task_names(data_dir):
        prompt = bbh.read_prompt_file(os.path.join(data_dir, "cot-prompts", f"{name}.txt"))
        examples = bbh.read_examples(os.path.join(data_dir, "bbh", f"{name}.json"))
        for style in bbh.STYLES:
            stem = os.path.join(data_dir, OUTPUTS, f"code-davinci-002-{style}", f"{name}_few_shot_template_0-255000")
            if not os.path.isfile(stem + ".json"):
                print(f"{name:45s} {style:6s} no official outputs file {stem}.json")
                continue
            with open(stem + ".json", encoding="utf-8") as f:
                outputs = json.load(f)["outputs"]
            with open(stem + "_eval_metrics.jsonl", encoding="utf-8") as f:
                published = json.loads(f.readline())["accuracy"]
            build = prompt.cot_prompt if style == "cot" else prompt.direct_prompt
            identical = sum(build(ex["input"]) == out["input"] for ex, out in zip(examples, outputs))
            answers = [bbh_answer(out["prediction"], chain_of_thought=style == "cot") for out in outputs]
            ours = strict_exact_match([out["target"] for out in outputs], answers)["exact_match"]
            same = abs(ours - published) < 1e-6
            differing_accuracy += not same
            totals["prompts"] += len(outputs)
            totals["identical"] += identical
            print(f"{name:45s} {style:6s} prompts identical {identical:3d}/{len(outputs):3d}   accuracy {ours:6.2f} "
                  f"(published {published:6.2f}){'' if same else '  DIFFERENT'}")
    print(f"{totals['identical']} of {totals['prompts']} prompts identical; {differing_accuracy} accuracies differ.")
    return differing_accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="a BIG-Bench-Hard checkout with code-davinci-002-outputs/")
    args = parser.parse_args(argv)
    return 1 if check(args.data_dir) else 0


if __name__ == "__main__":
    sys.exit(main())
