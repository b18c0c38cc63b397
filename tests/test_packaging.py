"""The wheel carries the gin files and the built-in task data, so an installed itjax works outside a checkout."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_ships_gin_files_and_quickstart_data(tmp_path):
    had_build_dir = os.path.exists(os.path.join(ROOT, "build"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    if not had_build_dir:  # setuptools' scratch folder in the checkout
        shutil.rmtree(os.path.join(ROOT, "build"), ignore_errors=True)
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for gin_file in ("quickstart.gin", "runs/train.gin", "models/t5_1_1_quickstart.gin", "partitioning/fsdp.gin",
                     "models/t5_family.gin", "models/t5_1_1_family.gin", "models/llama_family.gin"):
        assert f"itjax/_gin/{gin_file}" in names
    assert "itjax/tasks/quickstart.py" in names
    for module in ("itjax/conversion/__init__.py", "itjax/peft/__init__.py", "itjax/data/feature_converters.py",
                   "itjax/_gin/quickstart_decoder.gin"):
        assert module in names
    assert "itjax/tasks/data/quickstart/spm.model" in names
    assert "itjax/tasks/data/quickstart/task9001_copy_words.json" in names
