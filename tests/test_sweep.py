"""Studies from gin (itjax.study) and running them (itjax.sweep): grid expansion, state files, rerun skipping,
shards, dry-run validation errors, the SLURM script and one real run."""

import json
import os

import pytest

from itjax import study as study_lib
from itjax import sweep
from itjax.config import ConfigError

SUPERNI_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superni"))
needs_superni = pytest.mark.skipif(not os.path.isdir(SUPERNI_DIR), reason="needs ../shared/data/superni")
BIG = "task1155_bard_analogical_reasoning_trash_or_treasure"
OTHER = "task879_schema_guided_dstc8_classification"


def _study(**overrides):
    fields = dict(
        name="t", base_gin_files=["quickstart.gin"], base_bindings=["TRAIN_STEPS = 3", "x.data = '${root}'"],
        variables={"root": "/data"}, tasks=["ta", "tb"],
        axes={"setting": {"mtl": [], "stl": ["only.task = '${task}'"]},
              "size": {"10": ["n = 10"], "all": ["n = None"]}})
    fields.update(overrides)
    return study_lib.Study(**fields)


def test_grid_expands_into_cells_with_their_bindings():
    runs = study_lib.expand(_study())
    assert len(runs) == (1 + 2) * 2  # mtl + one stl cell per task, x 2 sizes
    by_id = {r.run_id: r for r in runs}
    stl = by_id["setting=stl__task=tb__size=all"]
    assert stl.cell == {"setting": "stl", "task": "tb", "size": "all"}
    assert stl.bindings == ("TRAIN_STEPS = 3", "x.data = '/data'", "only.task = 'tb'", "n = None")
    assert stl.gin_files == ("quickstart.gin",) and stl.stage == "main" and stl.depends_on is None
    assert by_id["setting=mtl__size=10"].bindings == ("TRAIN_STEPS = 3", "x.data = '/data'", "n = 10")
    assert study_lib.resolve_bindings(stl, "/s")[-1] == "MODEL_DIR = '/s/setting=stl__task=tb__size=all'"
    with pytest.raises(ConfigError, match=r"\$\{nope\}.*study.variables"):
        study_lib.expand(_study(base_bindings=["a = '${nope}'"]))
    with pytest.raises(ConfigError, match="study.tasks is empty"):
        study_lib.expand(_study(tasks=None))


def _staged():
    return _study(axes={"setting": {"mtl": [], "stl": ["only.task = '${task}'"]},
                        "start": {"t5": ["ckpt = 't5'"], "tk": ["ckpt = 'tk'"]}},
                  pre_stage={"axis": "pft", "values": {"none": None, "def": ["enc = 'def'"], "in": ["enc = 'in'"]},
                             "bindings": ["role = 'train'"], "inherit": ["start"]})


def test_pre_stage_runs_once_per_value_and_inherited_axes():
    runs = study_lib.expand(_staged())
    stage1 = [r for r in runs if r.stage == "pre"]
    mains = [r for r in runs if r.stage == "main"]
    assert len(stage1) == 2 * 2 and len(mains) == 3 * 2 * 3  # (def, in) x start; (mtl + 2 stl) x start x pft
    s1 = next(r for r in stage1 if r.run_id == "pre__pft=def__start=tk")
    assert s1.bindings == ("TRAIN_STEPS = 3", "x.data = '/data'", "ckpt = 'tk'", "role = 'train'", "enc = 'def'")
    cell = next(r for r in mains if r.cell == {"setting": "stl", "task": "ta", "start": "tk", "pft": "def"})
    assert cell.depends_on == cell.group == s1.run_id
    assert study_lib.resolve_bindings(cell, "/s")[-2] == f"train.initial_checkpoint_path = '/s/{s1.run_id}/export'"
    plain = next(r for r in mains if r.cell == {"setting": "mtl", "start": "t5", "pft": "none"})
    assert plain.depends_on is None and plain.group == plain.run_id and "ckpt = 't5'" in plain.bindings


@pytest.mark.parametrize("count", [1, 3, 7])
def test_shards_are_disjoint_covering_and_keep_stage2_with_stage1(count):
    runs = study_lib.expand(_staged())
    shards = [study_lib.shard(runs, i, count) for i in range(count)]
    ids = [r.run_id for s in shards for r in s]
    assert sorted(ids) == sorted(r.run_id for r in runs) and len(ids) == len(set(ids))
    for s in shards:
        mine = {r.run_id for r in s}
        assert all(r.depends_on in mine for r in s if r.depends_on)
    assert study_lib.parse_shard("2/3") == (2, 3)
    with pytest.raises(ConfigError, match="--shard"):
        study_lib.parse_shard("3/3")


def test_state_files_failures_and_rerun_skipping(tmp_path):
    runs = study_lib.expand(_staged())
    calls = []

    def fake_runner(command, log_path):  # fails the tk stage-1 run's training and one plain cell
        calls.append(command)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as f:
            f.write("line 1\nTraceback: boom\n")
        run_id = os.path.basename(os.path.dirname(log_path))
        bad = (run_id == "pre__pft=def__start=tk" and "itjax.train" in command) or \
            run_id == "setting=stl__task=tb__start=t5__pft=none"
        if "itjax.convert" in command and not bad:  # the export writes its folder
            os.makedirs(command[command.index("--out_dir") + 1])
        return 1 if bad else 0

    assert sweep.mark_planned(str(tmp_path), runs) == len(runs) and sweep.mark_planned(str(tmp_path), runs) == 0
    assert {sweep.read_state(str(tmp_path), r.run_id)["state"] for r in runs} == {"planned"}
    states = {r.run_id: sweep.execute(r, str(tmp_path), runner=fake_runner) for r in runs}
    # runs on the failed stage-1 run never start; the other 3 stage-1 runs are exported (one more command each)
    assert len(calls) == len(runs) - 3 + 3
    failed = {k for k, v in states.items() if v == "failed"}
    assert "pre__pft=def__start=tk" in failed and "setting=stl__task=tb__start=t5__pft=none" in failed
    dependent = [r.run_id for r in runs if r.depends_on == "pre__pft=def__start=tk"]
    assert failed == {"pre__pft=def__start=tk", "setting=stl__task=tb__start=t5__pft=none", *dependent}
    rec = sweep.read_state(str(tmp_path), "pre__pft=def__start=tk")
    assert rec["state"] == "failed" and "exited with status 1" in rec["error"] and "Traceback: boom" in rec["error"]
    assert rec["cell"] == {"pft": "def", "start": "tk"}
    dep = sweep.read_state(str(tmp_path), dependent[0])
    assert "stage-1 run pre__pft=def__start=tk is failed" in dep["error"]
    done = sweep.read_state(str(tmp_path), "setting=mtl__start=t5__pft=none")
    assert done["state"] == "done" and done["model_dir"] == str(tmp_path / "setting=mtl__start=t5__pft=none")
    assert not [f for f in os.listdir(tmp_path / "runs") if not f.endswith(".json") or f.startswith(".tmp")]

    calls.clear()  # rerun: done runs are skipped, failed ones retried; --skip_failed leaves them
    for r in runs:
        sweep.execute(r, str(tmp_path), runner=fake_runner, skip_failed=True)
    assert calls == []

    def fixed_runner(command, log_path):  # the failures are fixed: the retried runs and their dependents finish
        calls.append(os.path.basename(os.path.dirname(log_path)))
        if "itjax.convert" in command:
            os.makedirs(command[command.index("--out_dir") + 1])
        return 0

    assert all(sweep.execute(r, str(tmp_path), runner=fixed_runner) == "done" for r in runs)
    assert sorted(set(calls)) == sorted({"pre__pft=def__start=tk", "setting=stl__task=tb__start=t5__pft=none",
                                         *dependent})
    assert (tmp_path / "pre__pft=def__start=tk" / "export").is_dir()
    assert not (tmp_path / "pre__pft=def__start=tk" / "export.partial").exists()


def test_a_runner_that_cannot_start_is_recorded(tmp_path):
    run = study_lib.expand(_study())[0]

    def broken(command, log_path):
        raise OSError("no such interpreter")

    assert sweep.execute(run, str(tmp_path), runner=broken) == "failed"
    assert "OSError: no such interpreter" in sweep.read_state(str(tmp_path), run.run_id)["error"]


def _write_study(tmp_path, axes_extra="", bindings_extra=""):
    path = tmp_path / "study.gin"
    path.write_text(f"""
study.name = 'tiny'
study.base_gin_files = ['quickstart.gin']
study.variables = {{'superni_dir': {SUPERNI_DIR!r}}}
study.tasks = [{BIG!r}, {OTHER!r}]
study.base_bindings = ["import itjax.tasks.superni_gin", "register_superni.data_dir = '${{superni_dir}}'",
    "register_superni.only_tasks = ${{tasks}}", "register_superni.downstream_splits = True",
    "register_superni.max_num_instances_per_task = 4", "MIXTURE_OR_TASK_NAME = @superni_mixture()",
    "TASK_FEATURE_LENGTHS = {{'inputs': 64, 'targets': 8}}", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
    "train.eval_split = 'test'", "train.max_decode_length = 4", {bindings_extra}]
study.axes = {{'setting': {{'mtl': [], 'stl': ["superni_mixture.task = '${{task}}'"]}},
               'size': {{'10': ['register_superni.num_downstream_train_instances = 10']}}, {axes_extra}}}
""")
    return str(path)


@needs_superni
def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert sweep.main(["--gin_file", _write_study(tmp_path), "--out_dir", str(tmp_path / "s"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "3 runs (0 stage-1)" in out and f"task superni_{BIG}" in out and "task superni_default_test" in out
    assert "2 steps  1,152 tokens" in out and "total: 6 steps, 3,456 tokens" in out  # 2 x 8 x (64 + 8)
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


@needs_superni
@pytest.mark.parametrize("extra, kind, message", [
    ("'typo': {'x': [\"superni_mixture.task = 'task9999_missing'\"]}", "axes", "task9999_missing"),
    ("'bad': {'x': ['train.no_such_option = 3']}", "axes", "train.no_such_option"),
    ("", "bindings", "/no/such/checkpoint"),
    ("'m': {'x': ['MIXTURE_OR_TASK_NAME = \"nope_mixture\"']}", "axes", "nope_mixture"),
    ("'d': {'x': ['register_superni.data_dir = %gin.REQUIRED']}", "axes", "data_dir"),
])
def test_dry_run_names_the_bad_task_binding_or_checkpoint(tmp_path, capsys, extra, kind, message):
    if kind == "axes":
        path = _write_study(tmp_path, axes_extra=extra)
    else:
        path = _write_study(tmp_path, bindings_extra="\"train.initial_checkpoint_path = '/no/such/checkpoint'\"")
    assert sweep.main(["--gin_file", path, "--out_dir", str(tmp_path / "s"), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was started" in err and "run setting=" in err
    # without --dry_run the same check stops the sweep before any run starts
    assert sweep.main(["--gin_file", path, "--out_dir", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s" / "runs").exists()


@needs_superni
def test_slurm_script(tmp_path, capsys):
    script = tmp_path / "study.sh"
    args = ["--gin_file", _write_study(tmp_path), "--out_dir", str(tmp_path / "s"), "--slurm", str(script),
            "--num_shards", "4", "--slurm_directive", "#SBATCH --gres=gpu:1"]
    assert sweep.main(args) == 0
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --array=0-3\n" in text and "#SBATCH --gres=gpu:1\n" in text
    assert "-m itjax.sweep" in text and f"--out_dir={tmp_path / 's'}" in text
    assert '--shard "${SLURM_ARRAY_TASK_ID}/4"' in text and os.access(script, os.X_OK)
    assert f"#SBATCH --output={tmp_path / 's' / 'slurm'}/%A_%a.log" in text and (tmp_path / "s" / "slurm").is_dir()
    assert sweep.main(args) == 2 and "not overwritten" in capsys.readouterr().err
    assert script.read_text() == text


@needs_superni
@pytest.mark.slow
def test_one_real_run_and_rerun(tmp_path):
    st = study_lib.load_study([_write_study(tmp_path)])
    run = next(r for r in study_lib.expand(st) if r.cell.get("task") == BIG)
    out = str(tmp_path / "s")
    assert sweep.execute(run, out) == "done", sweep.read_state(out, run.run_id)
    model_dir = os.path.join(out, run.run_id)
    assert {"config.gin", "metrics.jsonl", "train.log"} <= set(os.listdir(model_dir))
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert any(r.get("split") == "test" and r.get("task") == f"superni_{BIG}" for r in records)
    size = os.path.getsize(os.path.join(model_dir, "train.log"))
    assert sweep.execute(run, out) == "done" and os.path.getsize(os.path.join(model_dir, "train.log")) == size


@needs_superni
def test_the_shipped_studies_expand_and_check(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "tk").mkdir()
    spm = os.path.join(os.path.dirname(__file__), "..", "tasks", "data", "quickstart", "spm.model")
    (tmp_path / "t5" / "spiece.model").write_bytes(open(spm, "rb").read())
    variables = {"superni_dir": SUPERNI_DIR, "missing_tasks": "skip", "tk_instruct_3b": str(tmp_path / "tk"),
                 "t5_3b": str(tmp_path / "t5")}
    ql = study_lib.load_study(["studies/quick_learners.gin"], [f"study.variables = {variables!r}"])
    runs = study_lib.expand(ql)  # the 119 test tasks of the official split list
    assert len(runs) == (1 + 119) * 4 * 2 * 2 * 1 * 3 + 2 * 2 * 1
    stage1 = runs[0]
    assert stage1.run_id == "pre__pft=def_pos_2__start=tk_instruct_3b__seed=0"
    cell = {"setting": "stl", "task": BIG, "size": "1000", "encoding": "input_only", "start": "tk_instruct_3b",
            "seed": "0", "pft": "def_pos_2"}
    stl = next(r for r in runs if r.cell == cell)
    assert stl.depends_on == stage1.run_id and f"superni_mixture.task = '{BIG}'" in stl.bindings
    assert "register_superni.num_downstream_train_instances = 1000" in stl.bindings
    mtl = next(r for r in runs if r.cell.get("setting") == "mtl" and r.cell["pft"] == "none")
    figures = sweep.check_runs([stage1, stl, mtl], str(tmp_path / "s"))
    assert figures[stage1.run_id]["task"] == "superni_default_train"
    assert figures[stl.run_id] == {"task": f"superni_{BIG}", "steps": 5, "batch_size": 16,  # 38 of 148, 2 epochs
                                   "tokens": 5 * 16 * (1024 + 128)}
    smoke = study_lib.expand(study_lib.load_study(["studies/smoke.gin"], [f"study.variables = {{'superni_dir': "
                                                                         f"{SUPERNI_DIR!r}}}"]))
    assert len(smoke) == (1 + 3) * 2 * 2 and set(sweep.check_runs(smoke, str(tmp_path / "s"))) == {
        r.run_id for r in smoke}


def test_stage1_export_is_redone_after_a_half_written_one(tmp_path):
    stage1 = next(r for r in study_lib.expand(_staged()) if r.stage == "pre")
    partial = tmp_path / stage1.run_id / "export.partial"
    partial.mkdir(parents=True)
    (partial / "stale").write_text("half")
    seen = []

    def runner(command, log_path):
        if "itjax.convert" in command:
            seen.append(sorted(os.listdir(partial)) if partial.exists() else None)
            os.makedirs(command[command.index("--out_dir") + 1])
            (partial / "model.gin").write_text("ok")
        return 0

    assert sweep.execute(stage1, str(tmp_path), runner=runner) == "done"
    assert seen == [None] and os.listdir(tmp_path / stage1.run_id / "export") == ["model.gin"]
    other = next(r for r in study_lib.expand(_staged()) if r.stage == "pre" and r.run_id != stage1.run_id)
    assert sweep.execute(other, str(tmp_path), runner=lambda command, log_path: 0) == "failed"
    assert "export wrote nothing" in sweep.read_state(str(tmp_path), other.run_id)["error"]


@needs_superni
def test_inprocess_runner_records_a_failing_run_and_refuses_other_commands(tmp_path):
    path = _write_study(tmp_path, bindings_extra="'train.no_such_option = 3'")
    run = study_lib.expand(study_lib.load_study([path]))[0]
    out = str(tmp_path / "s")
    assert sweep.execute(run, out, runner=sweep.inprocess_runner) == "failed"
    rec = sweep.read_state(out, run.run_id)
    assert "exited with status 2" in rec["error"] and "train.no_such_option" in rec["error"]
    with open(os.path.join(out, run.run_id, "train.log")) as f:
        assert "(in-process) " in f.read()
    log = tmp_path / "export.log"  # itjax.convert stops with SystemExit(message): the message goes to the log
    status = sweep.inprocess_runner(["python", "-m", "itjax.convert", "--from_run", str(tmp_path / "no_run"),
                                     "--out_dir", str(tmp_path / "export")], str(log))
    assert status == 1 and "itjax.convert: " in log.read_text() and "no_run" in log.read_text()
    with pytest.raises(ValueError, match="runs only `python -m itjax.train / itjax.convert`"):
        sweep.inprocess_runner(["python", "-m", "itjax.sweep"], str(tmp_path / "log"))
    import gin
    assert not gin.config._CONFIG  # the run's bindings are cleared after it


def test_study_report_options_are_filled_in_and_stored_in_the_plan(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    st = _study(report={"superni_dir": "${root}", "references": [{"name": "r", "value": 1.5,
                                                                   "where": {"size": "${root}"}}]},
                variables={"root": "data"})
    options = study_lib.report_options(st)
    assert options == {"superni_dir": str(tmp_path / "data"),  # an existing folder is made absolute
                       "references": [{"name": "r", "value": 1.5, "where": {"size": "data"}}]}
    sweep.write_plan(str(tmp_path / "s"), st, study_lib.expand(st))
    plan = json.loads((tmp_path / "s" / "study.json").read_text())
    assert plan["report"] == options and plan["axes"] == ["setting", "size"]
    with pytest.raises(ConfigError, match=r"study.report.*\$\{nope\}"):
        study_lib.report_options(_study(report={"superni_dir": "${nope}"}))
    ql = study_lib.load_study(["studies/quick_learners.gin"])  # gin's tuples / frozen dicts become JSON-able
    refs = study_lib.report_options(ql)["references"]
    assert json.loads(json.dumps(refs)) == refs and len(refs) == 7 and refs[0]["value"] == 54.30
