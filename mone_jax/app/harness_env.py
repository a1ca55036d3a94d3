"""What lm-evaluation-harness does around a ``mone-jax eval --tasks`` run, made to follow the command line:

- :func:`check_task_data`: before lm-eval starts, every task's dataset must be local (a data file, a task
  folder, the Hugging Face caches) or the hub reachable; otherwise one error line within seconds instead of a
  minute of retries;
- :func:`harness_output`: lm-eval's log records as ``mone-jax:`` lines at the level of ``--quiet`` /
  ``--debug``, its progress bars (and the datasets library's) only on a terminal, and its ``git describe``
  (the version of whatever repository the user stands in) without a ``fatal:`` line on stderr.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

from mone_jax.base.errors import UserError

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"}


def hub_reachable() -> bool:
    """:func:`mone_jax.app.hub.hub_reachable`, and no ``HF_DATASETS_OFFLINE``."""
    from mone_jax.app.hub import hub_reachable as reachable

    return os.environ.get("HF_DATASETS_OFFLINE", "").upper() not in ("1", "ON", "YES", "TRUE") and reachable()


def dataset_cached(path: str) -> bool:
    """Whether hub dataset ``path`` (``org/name``) has files in the hub cache or a prepared copy in the
    datasets cache (where ``load_dataset`` finds it offline)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}" / "snapshots"
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets") / path.replace("/", "___")
    return (hub.is_dir() and any(hub.iterdir())) or (prepared.is_dir() and any(prepared.iterdir()))


def hub_datasets(manager, tasks: list[str]) -> dict[str, str]:
    """``{task: hub dataset}`` of the tasks (groups and tags expanded) that read a dataset from the hub rather
    than from local files or a local folder."""
    out = {}
    for task in tasks:
        for name, cfg in _task_configs(manager, task):
            if _from_hub(cfg.get("dataset_path")):
                out[name] = str(cfg["dataset_path"])
    return out


def _from_hub(path) -> bool:
    """Whether a task's ``dataset_path`` names a hub dataset (not a local builder, file or folder)."""
    return bool(path) and path not in LOCAL_BUILDERS and not Path(str(path)).expanduser().exists()


def _task_configs(manager, spec, depth: int = 0) -> Iterator[tuple[str, dict]]:
    """(task name, its YAML config with includes merged) of a task, or of each task of a group or tag."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    if isinstance(spec, dict):  # a group member written inline
        cfg = spec
    else:
        entry = manager.task_index.get(spec)
        if entry is None or depth > 20:
            return
        if entry.kind == Kind.TAG:
            for name in sorted(entry.tags):
                yield from _task_configs(manager, name, depth + 1)
            return
        cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else (entry.cfg or {})
    members = cfg.get("task")
    if isinstance(members, list):  # a group
        for member in members:
            yield from _task_configs(manager, member, depth + 1)
    elif isinstance(members, str) and isinstance(spec, dict) and "dataset_path" not in cfg:
        yield from _task_configs(manager, members, depth + 1)
    elif isinstance(members, str):
        yield members, cfg


def check_task_data(manager, tasks: list[str]) -> bool:
    """Refuse, before lm-eval starts, tasks whose hub dataset is neither cached nor downloadable now; True when
    lm-eval must then run offline (hub datasets, all cached, hub unreachable: no minute of retries)."""
    needed = hub_datasets(manager, tasks)
    if not needed or hub_reachable():
        return False
    _refuse_missing(needed.values())
    return True


def quick_check(tasks: list[str], include_path: str | None) -> None:
    """:func:`check_task_data` in a second, before lm-eval is imported and indexes its thousands of task files:
    the plain tasks (not groups or tags, which the full check covers) found by their ``task:`` line under
    ``include_path`` and lm-eval's task folder."""
    found = _find_task_files(tasks, [Path(include_path)] if include_path else [])
    needed = [cfg["dataset_path"] for cfg in map(_read_task_yaml, found.values())
              if isinstance(cfg.get("task"), str) and _from_hub(cfg.get("dataset_path"))]
    if any(not dataset_cached(p) for p in needed) and not hub_reachable():
        _refuse_missing(needed)


def _refuse_missing(datasets) -> None:
    missing = sorted({p for p in datasets if not dataset_cached(p)})
    if missing:
        raise UserError(f"lm-eval dataset(s) {', '.join(missing)} not in the local cache and the Hugging Face hub "
                        "cannot be reached (offline or HF_HUB_OFFLINE): run once where the hub is reachable to fill "
                        "the cache (HF_HOME), or give --include-path with task YAML files that read local data "
                        "(dataset_path: json, dataset_kwargs: data_files)")


def _find_task_files(tasks: list[str], roots: list[Path]) -> dict[str, Path]:
    """``{task: YAML file}`` of the files under ``roots`` and lm-eval's own task folder (found without importing
    lm-eval) with a ``task: NAME`` line; the first root that has a name wins."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("lm_eval")
    if spec is not None and spec.submodule_search_locations:
        roots = [*roots, Path(next(iter(spec.submodule_search_locations))) / "tasks"]
    names = "|".join(re.escape(t) for t in tasks)
    line = re.compile(rf"^task:[ \t]*['\"]?({names})['\"]?[ \t]*$", re.M)
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.yaml")):
            for m in line.finditer(path.read_text(errors="replace")):
                found.setdefault(m[1], path)
        if len(found) == len(set(tasks)):
            break
    return found


def _read_task_yaml(path: Path, depth: int = 0) -> dict:
    """A task YAML with its ``include`` files merged under it; tags such as ``!function`` read as None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        cfg = yaml.load(path.read_text(errors="replace"), Loader=Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        return {}
    if not isinstance(cfg, dict):
        return {}
    merged: dict = {}
    includes = cfg.pop("include", None)
    for inc in ([] if includes is None or depth > 10 else includes if isinstance(includes, list) else [includes]):
        merged.update(_read_task_yaml(path.parent / str(inc), depth + 1))
    return {**merged, **cfg}


@contextmanager
def offline(on: bool) -> Iterator[None]:
    """The datasets library and huggingface_hub offline for the length of a block (when ``on``)."""
    if not on:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    with _swapped(datasets.config, "HF_HUB_OFFLINE", True), _swapped(constants, "HF_HUB_OFFLINE", True):
        yield


class _Lines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"mone-jax: {record.levelname.lower()}: lm-eval: {record.getMessage()}"


def _git_hash() -> str | None:
    """lm-eval's ``git describe --always`` of the working folder, with git's own complaints kept off stderr."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


@contextmanager
def harness_output(progress: bool, level: str = "warning") -> Iterator[None]:
    """For the length of a block: lm-eval's log records at ``level`` and above as ``mone-jax: LEVEL: lm-eval:``
    lines, its and the datasets library's progress bars only when ``progress``, its git lookup silent."""
    import datasets as ds_bars
    import lm_eval.api.task
    import lm_eval.evaluator
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lines())
    before = logger.level, logger.propagate, logger.handlers[:]
    bars_off = ds_bars.are_progress_bars_disabled()
    with ExitStack() as stack:
        stack.enter_context(_swapped(lm_eval.evaluator, "get_git_commit_hash", _git_hash))
        stack.enter_context(_swapped(lm_eval.api.task, "tqdm", partial(tqdm, disable=not progress)))
        logger.setLevel(level.upper())
        logger.handlers, logger.propagate = [handler], False
        if not progress:
            ds_bars.disable_progress_bars()
        try:
            yield
        finally:
            logger.setLevel(before[0])
            logger.propagate, logger.handlers = before[1], before[2]
            if not progress and not bars_off:
                ds_bars.enable_progress_bars()


@contextmanager
def _swapped(module, name: str, value) -> Iterator[None]:
    """``module.name`` is ``value`` for the length of a block."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
