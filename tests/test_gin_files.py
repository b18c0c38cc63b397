"""Every gin file the project ships parses, and the layout holds: model families + small size files, partitioning
rules defined once (in itjax/partitioning.py), gin names written one way."""

import logging
import os
import re

import gin
import pytest

import itjax.training  # noqa: F401  (registers the configurables the run, peft and model files bind)
from itjax import config as config_lib
from itjax import partitioning
from itjax.models.llama import LlamaConfig
from itjax.models.t5 import T5Config

GIN_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "gin")
ALL_FILES = sorted(os.path.relpath(os.path.join(d, f), GIN_DIR).replace(os.sep, "/")
                   for d, _, files in os.walk(GIN_DIR) for f in files if f.endswith(".gin"))
MODEL_FILES = [f for f in ALL_FILES if f.startswith("models/")]
FAMILY_FILES = [f for f in MODEL_FILES if f.endswith("_family.gin")]
SIZE_FILES = [f for f in MODEL_FILES if f not in FAMILY_FILES]
EXPERIMENTS = [f for f in ALL_FILES if "/" not in f]
PARTITIONING = {"partitioning/data_parallel.gin": partitioning.DATA_PARALLEL_RULES,
                "partitioning/fsdp.gin": partitioning.FSDP_RULES,
                "partitioning/tensor_parallel.gin": partitioning.TENSOR_PARALLEL_RULES,
                "partitioning/2d.gin": partitioning.STANDARD_2D_RULES}


def _bindings(text: str) -> list[str]:
    """The `name = value` lines of a gin file (a value spread over lines counts once)."""
    return [line for line in text.splitlines() if re.match(r"^[A-Za-z_][\w.]*(/[\w.]+)?\s*=", line)]


def test_the_files_are_all_found():
    assert len(ALL_FILES) >= 40 and "runs/train.gin" in ALL_FILES and "quickstart.gin" in ALL_FILES
    assert {"models/t5_family.gin", "models/t5_1_1_family.gin", "models/llama_family.gin"} <= set(FAMILY_FILES)
    assert set(PARTITIONING) == {f for f in ALL_FILES if f.startswith("partitioning/")}


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_gin_file_parses(name):
    config_lib.parse_gin_file(os.path.join(GIN_DIR, name))
    assert gin.config_str()  # it bound something


@pytest.mark.parametrize("name", SIZE_FILES)
def test_every_size_file_builds_its_model_config(name):
    config_lib.parse_gin_file(os.path.join(GIN_DIR, name))
    model = gin.query_parameter("MODEL/macro.value")
    config_cls = {"itjax.models.EncoderDecoderModel": T5Config,
                  "itjax.models.DecoderOnlyModel": LlamaConfig}[model.configurable.selector]
    config = gin.get_configurable(config_cls)()  # every size the class needs is bound
    assert config.vocab_size % 128 == 0


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_is_a_complete_run(name):
    # What the recipes leave to the command line (flan_t5_xl.gin: MODEL_DIR, the task, the converted weights).
    config_lib.parse_gin([name], [], required_macros=config_lib.REQUIRED_TRAIN_MACROS,
                         macro_defaults={"MODEL_DIR": "/tmp/run", "MIXTURE_OR_TASK_NAME": "quickstart",
                                         "INITIAL_CHECKPOINT_PATH": "/tmp/ckpt"})


@pytest.mark.parametrize("name", SIZE_FILES)
def test_size_files_include_one_file_and_set_only_what_differs(name):
    text = open(os.path.join(GIN_DIR, name)).read()
    includes = re.findall(r"^include '([^']+)'", text, flags=re.M)
    assert len(includes) == 1 and includes[0].startswith("models/"), name
    assert len(_bindings(text)) <= 12, f"{name}: move shared bindings to its family file"
    assert "import " not in text  # the family file imports the model module


def test_family_files_cannot_be_taken_for_a_size_and_hold_the_shared_bindings():
    for name in FAMILY_FILES:
        assert "base" not in os.path.basename(name)
    text = open(os.path.join(GIN_DIR, "models/t5_family.gin")).read()
    assert "MODEL = @EncoderDecoderModel()" in text and "T5Config.relative_attention_num_buckets" in text


@pytest.mark.parametrize("name", sorted(PARTITIONING))
def test_partitioning_files_bind_the_rules_defined_in_python(name):
    text = open(os.path.join(GIN_DIR, name)).read()
    assert "logical_axis_rules = %itjax.partitioning." in text and "('batch'" not in text
    config_lib.parse_gin_file(os.path.join(GIN_DIR, name))
    assert partitioning.Partitioner().rules == tuple(PARTITIONING[name])


@pytest.mark.parametrize("name", ALL_FILES)
def test_gin_names_are_written_one_way(name):
    """Configurables by their short name (`T5Config.d_model`, `@T5Config()`), as the family files' header says."""
    text = open(os.path.join(GIN_DIR, name)).read()
    assert not re.search(r"^itjax\.[\w.]+\s*=", text, flags=re.M), name
    assert "@itjax." not in text, name


def test_parsing_leaves_no_search_path_reader_or_log_filter_behind():
    prefixes, readers = list(gin.config._LOCATION_PREFIXES), list(gin.config._FILE_READERS)
    filters = list(logging.getLogger().filters)
    config_lib.parse_gin(["quickstart.gin"], [], required_macros=config_lib.REQUIRED_TRAIN_MACROS)
    assert gin.config._LOCATION_PREFIXES == prefixes and gin.config._FILE_READERS == readers
    assert logging.getLogger().filters == filters
    # Includes need the project's gin/ folder on the search path, which only parse_gin / parse_gin_file add.
    gin.clear_config()
    with pytest.raises(IOError, match="models/t5_1_1_family.gin"):
        gin.parse_config_file(os.path.join(GIN_DIR, "models/t5_1_1_small.gin"))
