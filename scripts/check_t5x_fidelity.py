"""Scores T5X-format checkpoints with T5X's own network code and with their itjax conversion; prints both.

t5x is not installable on the project's machines, so this is a script run against a t5x source checkout rather than
a test: it builds the per-layer cases of tests/test_convert_t5x.py (legacy gated-GELU with config.gin, orbax ReLU
with a tied output layer), converts them with `itjax.convert --t5x_checkpoint`, and compares per-example
log-likelihoods (T5X `EncoderDecoderModel.score_batch`: decoder inputs = targets shifted right with 0 first, sum of
the target tokens' log-probabilities) with those of `t5x/examples/t5/network.py` applied to the T5X parameters.
Only that network's two files are imported from the checkout (t5x/__init__ pulls in T5X's whole training stack).

    python scripts/check_t5x_fidelity.py /path/to/t5x      # last line: "max relative difference: X"
"""

import argparse
import importlib
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import test_convert_t5x as cases  # noqa: E402  (the checkpoint writers and scorers of the tests)
from itjax import convert  # noqa: E402


def t5x_network(t5x_source: str, workdir: str):
    package = os.path.join(workdir, "src", "t5x", "examples", "t5")
    os.makedirs(package)
    for folder in (os.path.dirname(os.path.dirname(package)), os.path.dirname(package), package):
        open(os.path.join(folder, "__init__.py"), "w").close()
    for name in ("network.py", "layers.py"):
        shutil.copyfile(os.path.join(t5x_source, "t5x", "examples", "t5", name), os.path.join(package, name))
    sys.path.insert(0, os.path.join(workdir, "src"))
    return importlib.import_module("t5x.examples.t5.network")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("t5x_source", help="a t5x source checkout (the folder holding t5x/examples/t5/network.py)")
    args = parser.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as workdir:
        network = t5x_network(args.t5x_source, workdir)
        for case in ("legacy_t5_1_1", "orbax_t5_1_0"):
            root = os.path.join(workdir, case)
            params, ckpt, gin_file = cases._write_case(root, case)
            _, _, activations, tied, _, _ = cases.CASES[case]
            out_dir = os.path.join(root, "itjax")
            argv = ["--t5x_checkpoint", ckpt, "--out_dir", out_dir]
            if gin_file:
                argv += ["--t5x_gin", gin_file]
            convert.main(argv)
            config = network.T5Config(
                vocab_size=cases.VOCAB, dtype=jnp.float32, emb_dim=cases.EMBED, num_heads=cases.HEADS,
                num_encoder_layers=cases.ENC_LAYERS, num_decoder_layers=cases.DEC_LAYERS, head_dim=cases.HEAD_DIM,
                mlp_dim=cases.MLP, mlp_activations=activations, dropout_rate=0.0, logits_via_embedding=tied)
            b = cases.batch(seed=4)
            logits = network.Transformer(config).apply(
                {"params": cases._nest(params)}, b["encoder_input_tokens"], b["decoder_input_tokens"],
                b["decoder_target_tokens"], enable_dropout=False)
            log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
            targets = b["decoder_target_tokens"]
            t5x = (np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * b["decoder_loss_weights"]).sum(-1)
            ours = np.asarray(cases.itjax_scores(out_dir, b)[1])
            difference = float(np.max(np.abs(ours - t5x) / np.abs(t5x)))
            worst = max(worst, difference)
            print(f"{case}: T5X {np.round(t5x, 4).tolist()}\n{' ' * len(case)}  itjax {np.round(ours.astype(np.float64), 4).tolist()}")
    print(f"max relative difference: {worst:.3g}")


if __name__ == "__main__":
    main()
