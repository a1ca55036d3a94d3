"""``eval --tasks`` offline (issue 26): a task whose hub dataset is neither cached nor reachable is refused in
seconds with one line, before lm-eval starts; a dataset laid out in the hub cache (huggingface_hub's layout, the
cache pointed at tmp_path) or a task reading local files passes."""

from __future__ import annotations

import time

import pytest

from mone_jax.app.cli import main
from mone_jax.app.harness_env import quick_check
from mone_jax.base.errors import UserError
from mone_jax.demo import demo_model_dir


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE and empty hub / datasets caches under tmp_path, for this process's huggingface_hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path / "hub"


@pytest.fixture
def task_dir(tmp_path):
    """Two task YAMLs: one reading a hub dataset (through an include), one a local jsonl file."""
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "base.yaml").write_text("dataset_path: someorg/somedata\noutput_type: multiple_choice\n"
                                 "doc_to_text: !function utils.text\n")
    (d / "hub_task.yaml").write_text("include: base.yaml\ntask: hub_task\n")
    (tmp_path / "docs.jsonl").write_text('{"q": "a", "a": 0}\n')
    (d / "local_task.yaml").write_text(f"task: local_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {tmp_path / 'docs.jsonl'}\n")
    return d


def test_offline_task_without_its_data_is_refused_in_seconds(offline_hub, task_dir, capsys):
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(["eval", str(demo_model_dir()), "--tasks", "local_task,hub_task", "--include-path", str(task_dir)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and seconds < 5
    assert err.count("\n") == 1 and err.startswith("mone-jax: error: lm-eval dataset(s) someorg/somedata not in")
    assert "--include-path" in err and "cache" in err and "local_task" not in err


def test_a_dataset_in_the_hub_cache_or_local_files_pass(offline_hub, task_dir):
    quick_check(["local_task"], str(task_dir))  # local files: no hub needed
    with pytest.raises(UserError, match="someorg/somedata"):
        quick_check(["hub_task"], str(task_dir))
    snapshot = offline_hub / "datasets--someorg--somedata" / "snapshots" / ("0" * 40)  # huggingface_hub's layout
    snapshot.mkdir(parents=True)
    (snapshot / "test.parquet").write_bytes(b"PAR1")
    quick_check(["hub_task", "local_task"], str(task_dir))


@pytest.mark.slow  # imports lm-eval
def test_a_builtin_task_offline_names_its_dataset(offline_hub):
    pytest.importorskip("lm_eval")
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reading of the task file, the reference

    from mone_jax.app.harness_env import _find_task_files

    path = _find_task_files(["arc_easy"], [])["arc_easy"]
    want = load_yaml(path, resolve_func=False)["dataset_path"]
    assert yaml.safe_load(path.read_text())["task"] == "arc_easy"
    with pytest.raises(UserError, match=want):
        quick_check(["arc_easy"], None)


@pytest.mark.slow  # lm-eval indexes its task files
def test_groups_and_tags_are_checked_after_lm_evals_index(offline_hub):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from mone_jax.app.harness_env import check_task_data, hub_datasets

    manager = TaskManager()
    assert hub_datasets(manager, ["ai2_arc"]) == {"arc_challenge": "allenai/ai2_arc", "arc_easy": "allenai/ai2_arc"}
    mmlu = hub_datasets(manager, ["mmlu"])
    assert len(mmlu) == 57 and set(mmlu.values()) == {"cais/mmlu"}  # MMLU's 57 subjects, one dataset
    with pytest.raises(UserError, match="allenai/ai2_arc"):
        check_task_data(manager, ["ai2_arc"])
