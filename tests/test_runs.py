"""`itjax.runs.load`: a run's MODEL_DIR (full, LoRA, scanned) or an `itjax.convert` folder -> model, parameters
(only those: the optimizer state is never read), vocabulary; `python -m itjax.infer --checkpoint_path` on both with
no training macros; bad paths, steps and base pointers reported with exit 2 and nothing written.

Runs are written here as `itjax.train` writes them (config.gin + `itjax.checkpoints.Checkpointer`) from the
quickstart config with shifted parameters and non-zero optimizer state, without training (fast).
"""

import json
import os
import shutil

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from itjax import config as config_lib
from itjax import convert, infer, inference, runs
from itjax.checkpoints import Checkpointer, restore_peft_base
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (gin configurables)

QUICKSTART = ["TASK_FEATURE_LENGTHS = {'inputs': 128, 'targets': 16}", "BATCH_SIZE = 8", "TRAIN_STEPS = 4"]
SPM = os.path.join(os.path.dirname(__file__), "..", "tasks", "data", "quickstart", "spm.model")


def _shifted(tree, by):
    return jax.tree.map(lambda x: x + by if np.issubdtype(x.dtype, np.floating) else x, tree)


def _write_run(model_dir, *bindings, base_dir=None, steps=(2, 4)):
    """A run in MODEL_DIR as itjax.train leaves it: config.gin and checkpoints at `steps` whose parameters are the
    fresh initialisation shifted by the step (optimizer state: its init shifted too, so it is non-zero). LoRA runs
    (peft/lora.gin in bindings) are on the base folder `base_dir`. Returns {step: saved params (host)}."""
    gin.clear_config()
    files = ["quickstart.gin"] + (["peft/lora.gin"] if base_dir else [])
    initial = [f"train.initial_checkpoint_path = '{base_dir}'"] if base_dir else []
    config_lib.parse_gin(files, [*QUICKSTART, f"MODEL_DIR = '{model_dir}'", *initial, *bindings],
                         required_macros=config_lib.REQUIRED_TRAIN_MACROS)
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
    peft = gin.query_parameter("train.peft").scoped_configurable_fn() if base_dir else None
    trainer = Trainer(model, optimizer, Partitioner(), peft=peft)
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    gin.clear_config()
    checkpointer = Checkpointer(model_dir, period=1, use_async=False)
    if base_dir:
        checkpointer.base_pointer = restore_peft_base(trainer, str(base_dir))
    state = trainer.init_state()
    saved = {}
    for step in steps:
        shifted = {"step": np.int32(step), "params": _shifted(state["params"], 0.01 * step),
                   "opt_state": _shifted(state["opt_state"], 1.0)}
        checkpointer.save(step, shifted, {"batches_consumed": step})
        saved[step] = jax.device_get(shifted["params"])
    checkpointer.close()
    return saved


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def full_run(root):
    return str(root / "full"), _write_run(str(root / "full"))


@pytest.fixture(scope="module")
def base_folder(root, full_run):
    """An itjax.convert-style folder (checkpoint/ + model.gin + spiece.model): the full run exported."""
    out = root / "converted"
    convert.main(["--from_run", full_run[0], "--out_dir", str(out)])
    shutil.copyfile(SPM, out / "spiece.model")
    return out


@pytest.fixture(scope="module")
def lora_run(root, base_folder):
    return str(root / "lora"), _write_run(str(root / "lora"), "LoRA.rank = 4", base_dir=base_folder)


def test_loads_a_full_run_at_the_latest_and_a_given_step(full_run):
    model_dir, saved = full_run
    loaded = runs.load(model_dir)
    assert (loaded.kind, loaded.step, loaded.peft) == ("run", 4, None)
    assert loaded.feature_lengths == {"inputs": 128, "targets": 16}
    assert loaded.vocabulary.vocab_size > 0 and loaded.add_eos("inputs")
    _assert_equal(loaded.params, saved[4])
    # Straight into the trainer's shardings (the default partitioner: all 8 test devices).
    leaf = jax.tree.leaves(loaded.params)[0]
    assert leaf.sharding == jax.tree.leaves(loaded.trainer.param_shardings)[0]
    assert len(leaf.sharding.device_set) == jax.device_count()
    _assert_equal(runs.load(model_dir, 2).params, saved[2])


def test_reads_only_the_parameters(full_run, monkeypatch):
    """What orbax deserialises is the `params` subtree: the optimizer state (here as large as the parameters,
    Adafactor's factored moments aside) is never read."""
    read = []
    original = ocp.type_handlers.ArrayHandler.deserialize

    async def spy(self, infos, args=None):
        read.extend(info.name for info in infos)
        return await original(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", spy)
    loaded = runs.load(full_run[0])
    assert len(read) == len(jax.tree.leaves(loaded.params))
    assert all(name.startswith("params.") for name in read), read[:5]


def test_loads_a_converted_folder(full_run, base_folder):
    loaded = runs.load(str(base_folder))
    assert (loaded.kind, loaded.step, loaded.feature_lengths) == ("converted", None, None)
    # No task: the vocabulary is the folder's tokenizer (spiece.model, the quickstart task's SentencePiece model).
    assert loaded.task is None and loaded.vocabulary.encode("red blue") == runs.load(full_run[0]).vocabulary.encode(
        "red blue")
    _assert_equal(loaded.params, full_run[1][4])


def test_loads_a_lora_run_with_its_base(lora_run, base_folder):
    model_dir, saved = lora_run
    loaded = runs.load(model_dir)
    assert type(loaded.peft).__name__ == "LoRA" and loaded.peft.rank == 4
    assert loaded.initial_checkpoint_path == str(base_folder)
    _assert_equal(loaded.params, saved[4])
    _assert_equal(loaded.base_params, runs.load(str(base_folder)).params)


def test_loads_a_scanned_run_in_either_layout(root):
    model_dir = str(root / "scanned")
    saved = _write_run(model_dir, "T5Config.scan_layers = True")
    loaded = runs.load(model_dir)
    from itjax.models import scan
    assert scan.is_stacked(loaded.params)
    _assert_equal(loaded.params, saved[4])
    # Overridden to per-layer modules, the stacked checkpoint is unstacked on load.
    per_layer = runs.load(model_dir, bindings=["T5Config.scan_layers = False"])
    assert scan.is_stacked(per_layer.params) is False
    _assert_equal(per_layer.params, scan.unstack_layers(saved[4]))


def test_generate_examples_compiles_once_per_setting(full_run, monkeypatch):
    loaded = runs.load(full_run[0])
    traced = []
    decode_fns = loaded.model.decode_fns
    monkeypatch.setattr(loaded.model, "decode_fns", lambda *a, **k: traced.append(1) or decode_fns(*a, **k))
    examples = [{"inputs": "copy: a b"}, {"inputs": "copy: c"}]

    def run(**kw):
        return inference.generate_examples(loaded.trainer, loaded.params, examples, loaded.vocabulary,
                                           input_length=16, max_decode_length=4, batch_size=8, **kw)
    first = run()
    assert run() == first and len(traced) == 1  # the second call reuses the compiled function
    run(decode="beam", num_beams=2)
    assert len(traced) == 2


# ------------------------------------------------------------------------------------------------- infer CLI
def _infer(tmp_path, lines, *flags):
    gin.clear_config()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    if out.exists():
        out.unlink()
    code = infer.main([f"--input_file={inp}", f"--output_file={out}", "--batch_size=8", *flags])
    return code, ([json.loads(line) for line in out.read_text().splitlines()] if out.exists() else None)


LINES = [{"inputs": "Definition: copy the words. Input: red blue", "targets": "red blue"},
         {"inputs": "Definition: reverse the words. Input: one two three", "targets": "three two one"}]


def test_infer_on_a_converted_folder_and_a_run_without_train_macros(full_run, base_folder, tmp_path):
    code, from_run = _infer(tmp_path, LINES, f"--checkpoint_path={full_run[0]}")
    assert code == 0 and all(r["prediction_ids"] for r in from_run)
    # The converted folder (same weights; its own tokenizer, no task): the same tokens once the lengths match.
    code, converted = _infer(tmp_path, LINES, f"--checkpoint_path={base_folder}", "--input_length=128",
                             "--max_decode_length=16")
    assert code == 0
    assert [r["prediction_ids"] for r in converted] == [r["prediction_ids"] for r in from_run]
    code, scored = _infer(tmp_path, LINES, f"--checkpoint_path={base_folder}", "--mode=score")
    code_run, scored_run = _infer(tmp_path, LINES, f"--checkpoint_path={full_run[0]}", "--mode=score")
    assert code == code_run == 0
    np.testing.assert_allclose([r["log_likelihood"] for r in scored], [r["log_likelihood"] for r in scored_run],
                               rtol=1e-5)
    assert all(r["log_likelihood"] < 0 for r in scored)
    # --gin.X overrides the folder's config: a different checkpoint step gives other predictions.
    code, step2 = _infer(tmp_path, LINES, f"--checkpoint_path={full_run[0]}", "--checkpoint_step=2", "--mode=score")
    assert code == 0 and [r["log_likelihood"] for r in step2] != [r["log_likelihood"] for r in scored_run]


def test_infer_gin_overrides_apply(full_run, tmp_path, capsys):
    code, _ = _infer(tmp_path, LINES, f"--checkpoint_path={full_run[0]}", "--gin.T5Config.d_model=64")
    assert code == 2
    assert "does not match the configured model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- bad input
def _bad(tmp_path, capsys, *flags):
    code, written = _infer(tmp_path, LINES, *flags)
    assert code == 2 and written is None
    return capsys.readouterr().err


def test_a_wrong_checkpoint_path_is_reported(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    err = _bad(tmp_path, capsys, f"--checkpoint_path={tmp_path}")
    assert f"{tmp_path} is neither a training run's MODEL_DIR" in err
    err = _bad(tmp_path, capsys, f"--checkpoint_path={tmp_path / 'missing'}")
    assert f"{tmp_path / 'missing'} does not exist" in err
    err = _bad(tmp_path, capsys)
    assert "pass --checkpoint_path" in err


def test_a_missing_step_lists_the_steps(full_run, base_folder, tmp_path, capsys):
    err = _bad(tmp_path, capsys, f"--checkpoint_path={full_run[0]}", "--checkpoint_step=3")
    assert "has no checkpoint at step 3; its checkpoints are at steps 2, 4" in err
    err = _bad(tmp_path, capsys, f"--checkpoint_path={base_folder}", "--checkpoint_step=3")
    assert "is an itjax.convert folder" in err


def _pointer_file(model_dir, step=4):
    return os.path.join(model_dir, "checkpoints", str(step), "base", "metadata")


def test_a_corrupt_or_dangling_base_pointer_is_reported(lora_run, base_folder, root, tmp_path, capsys):
    corrupt = str(root / "lora_corrupt")
    shutil.copytree(lora_run[0], corrupt)
    with open(_pointer_file(corrupt), "w") as f:
        f.write("{not json")
    err = _bad(tmp_path, capsys, f"--checkpoint_path={corrupt}")
    assert f"{os.path.join(corrupt, 'checkpoints', '4', 'base')}: the base pointer is unreadable" in err

    moved = str(root / "lora_moved")
    shutil.copytree(lora_run[0], moved)
    with open(_pointer_file(moved)) as f:
        pointer = json.load(f)
    pointer["path"] = str(root / "gone")
    with open(_pointer_file(moved), "w") as f:
        json.dump(pointer, f)
    err = _bad(tmp_path, capsys, f"--checkpoint_path={moved}")
    assert f"points to the base model {root / 'gone'}, which does not exist" in err
    # Its new location can be given (and is checked against the fingerprint).
    _assert_equal(runs.load(moved, base_path=str(base_folder)).params, lora_run[1][4])
    with pytest.raises(runs.RunLoadError, match="base pointer is missing|no base pointer"):
        shutil.rmtree(os.path.join(moved, "checkpoints", "2", "base"))
        runs.load(moved, 2)


def test_an_unreadable_checkpoint_is_reported(full_run, root, tmp_path, capsys):
    broken = str(root / "full_broken")
    shutil.copytree(full_run[0], broken)
    state = os.path.join(broken, "checkpoints", "4", "state")
    for folder, _, files in os.walk(state):  # truncate every array file
        for name in files:
            if os.path.basename(folder) == "d":
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(16)
    err = _bad(tmp_path, capsys, f"--checkpoint_path={broken}")
    assert f"checkpoint {state} is unreadable" in err and "load another step" in err
    _assert_equal(runs.load(broken, 2).params, full_run[1][2])  # the other steps still load
