"""MODEL_DIR as a `gs://` URL: the files itjax writes itself (the write probe, config.gin, metrics.jsonl,
predictions) go through etils.epath, so they land in the bucket. The bucket is faked with epath's own mock
backend, which maps `gs://bucket/...` onto a local folder; orbax (checkpoints) and tf.io (iterator states) take
URLs natively and are not exercised here (that needs a GCS emulator)."""

import json
import os

import gin
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from itjax import config as config_lib
from itjax import training
from itjax.checkpoints import absolute
from itjax.evaluation import MetricsWriter, write_predictions

FUNCTIONS = ["open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rename", "replace", "glob",
             "walk", "stat", "rmtree"]


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """gs://bucket/... -> tmp_path/bucket/... for every epath call; returns the local root."""
    from etils.epath import gpath
    # With TensorFlow installed epath sends gs:// to tf.io.gfile and bypasses its (mockable) backend table.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    def local(path):
        text = os.fspath(path)
        return str(tmp_path) + "/" + text[len("gs://"):] if text.startswith("gs://") else text

    def translated(original, path, *args, **kwargs):
        assert os.fspath(path).startswith("gs://"), f"a local path reached the gs:// backend: {path}"
        return original(local(path), *[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args],
                        **kwargs)
    with epath_testing.mock_epath(**{name: translated for name in FUNCTIONS}):
        yield tmp_path / "bucket"


def test_urls_stay_urls():
    assert absolute("gs://bucket/run") == "gs://bucket/run"
    assert absolute("relative/run") == os.path.join(os.getcwd(), "relative/run")


def test_run_files_are_written_to_the_bucket(fake_bucket):
    model_dir = "gs://bucket/runs/r1"
    training._check_model_dir(model_dir)  # creates the folder, probes it, leaves nothing behind
    assert (fake_bucket / "runs" / "r1").is_dir() and not list((fake_bucket / "runs" / "r1").iterdir())

    gin.parse_config("x = 1")
    config_lib.save_operative_config(model_dir)
    assert (fake_bucket / "runs" / "r1" / "config.gin").exists()

    writer = MetricsWriter(model_dir, tensorboard=False)
    for step in (10, 20):
        writer.write({"step": step, "split": "validation", "task": "t", "rougeL": 50.0 + step})
    lines = (fake_bucket / "runs" / "r1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    # A rerun reads the finished evaluation back from the bucket.
    assert training._logged_results(model_dir, 20, "validation") == {"t": {"rougeL": 70.0}}

    write_predictions(os.path.join(model_dir, "predictions"), "t", 20,
                      {"input": ["q"], "target": [["a"]], "prediction": ["b"], "score": None})
    line = json.loads((fake_bucket / "runs" / "r1" / "predictions" / "t-20.jsonl").read_text())
    assert line == {"input": "q", "prediction": "b", "references": ["a"]}
    assert epath.Path(model_dir, "metrics.jsonl").exists()
