"""itjax.evaluation.MetricsWriter: metrics.jsonl lines and the TensorBoard event files beside them (TF's event
writer: each number a rank-0 float summary under the scalars plugin, at the record's step, in `<split>/<task>`)."""

import glob
import json
import math
import os

import tensorflow as tf

from itjax.evaluation import MetricsWriter


def _scalars(event_dir):
    """[(tag, step, value, plugin name)] of every summary value in the event files under `event_dir`."""
    found = []
    for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.append((value.tag, event.step, float(tf.make_ndarray(value.tensor)),
                              value.metadata.plugin_data.plugin_name))
    return found


def test_records_go_to_jsonl_and_tensorboard_scalars(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write({"step": 10, "split": "train", "task": "all", "loss": 2.5, "accuracy": 0.25, "note": "text"})
    writer.write({"step": 20, "split": "train", "task": "all", "loss": 1.5, "accuracy": float("nan")})
    writer.write({"step": 20, "split": "validation", "task": "copy", "rougeL": 40.0}, tensorboard_name="eval/copy")
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [(10, "train"), (20, "train"), (20, "validation")]
    assert lines[0]["note"] == "text" and math.isnan(lines[1]["accuracy"])

    # Strings and non-finite numbers are not plotted; everything else is, at its step, for the scalars dashboard.
    assert sorted(_scalars(tmp_path / "tensorboard" / "train" / "all")) == [
        ("accuracy", 10, 0.25, "scalars"), ("loss", 10, 2.5, "scalars"), ("loss", 20, 1.5, "scalars")]
    assert _scalars(tmp_path / "tensorboard" / "eval" / "copy") == [("rougeL", 20, 40.0, "scalars")]


def test_without_tensorboard_only_the_jsonl_is_written(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write({"step": 1, "split": "train", "task": "all", "loss": 1.0})
    writer.close()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
