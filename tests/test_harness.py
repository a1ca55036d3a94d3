"""lm-evaluation-harness on the JAX model (`mone-jax eval --tasks`) against the harness's own `hf`
(transformers) model, on local tasks written from corpus text: the demo model and its substitution
and drop exports; the same evaluation on a 2x4 CPU mesh through the CLI, and the same generations
request by request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # lm-evaluation-harness end to end
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the harness's `hf` model, the reference

from mone_jax.app.cli import main  # noqa: E402
from mone_jax.app.harness import evaluate_tasks  # noqa: E402
from mone_jax.demo import demo_model_dir  # noqa: E402

DEMO = demo_model_dir()
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
MC, GEN = "mone_cloze", "mone_continue"
LIMIT = 8


def _lines(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct prose lines of valid.txt (at least 8 words, letters only at the start)."""
    lines = [ln.strip() for ln in (CORPUS / "valid.txt").read_text().splitlines()]
    lines = sorted({ln for ln in lines if len(ln.split()) >= 8 and ln[0].isalpha()})
    return [lines[i] for i in rng.choice(len(lines), n, replace=False)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    if not (CORPUS / "valid.txt").is_file():
        pytest.skip("shared corpus absent: ../shared/corpus/valid.txt exists only in the project workspace")
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task (the true next words of a line vs those of three other lines) and a
    generation task (continue a line until a newline or full stop), as task YAML + jsonl in ``folder``."""
    rng = np.random.default_rng(0)
    lines = _lines(4 * LIMIT, rng)
    heads = [" ".join(ln.split()[:5]) for ln in lines]
    tails = [" " + " ".join(ln.split()[5:8]) for ln in lines]
    with open(folder / "cloze.jsonl", "w") as f:
        for i in range(LIMIT):
            others = [tails[j] for j in rng.choice([j for j in range(len(lines)) if j != i], 3, replace=False)]
            answer = int(rng.integers(4))
            choices = others[:answer] + [tails[i]] + others[answer:]
            f.write(json.dumps({"context": heads[i], "choices": choices, "answer": answer}) + "\n")
    with open(folder / "continue.jsonl", "w") as f:
        for i in range(LIMIT):
            f.write(json.dumps({"prompt": heads[i], "target": tails[i]}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / f"{MC}.yaml").write_text(
        f"task: {MC}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'cloze.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / f"{GEN}.yaml").write_text(
        f"task: {GEN}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'continue.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The demo model's substitution export (25% pruned), made with `mone-jax prune`."""
    if not (CORPUS / "valid.txt").is_file():
        pytest.skip("shared corpus absent")
    out = tmp_path_factory.mktemp("exports")
    stats = out / "stats.npz"
    calib = ["--calib", str(CORPUS / "valid.txt"), "--num-samples", "8", "--seq-len", "64", "--stats-out", str(stats)]
    folders = {"substitution": out / "substitution"}
    assert main(["prune", str(DEMO), *calib, "--ratio", "0.25", "--out", str(folders["substitution"]), "--quiet"]) == 0
    return folders


def _per_request(results: dict, task: str) -> list:
    """The model responses to every request of every document, in document order."""
    return [[r[0] for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _hf_results(folder: Path, task_dir: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = HFLM(pretrained=str(folder), trust_remote_code=True, dtype="float32", batch_size=8, device="cpu")
    hf.model.generation_config.max_new_tokens = None  # the demo's 64 would override the task's max_gen_toks
    return simple_evaluate(model=hf, tasks=[MC, GEN], task_manager=TaskManager(include_path=str(task_dir)),
                           log_samples=True)


@pytest.fixture(scope="module")
def jax_results(exports, task_dir):
    """name -> JaxLM's results (with samples) on one device; computed once per model."""
    from mone_jax.model.sharding import single_device_mesh

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = evaluate_tasks(str(exports[name]), [MC, GEN], include_path=str(task_dir),
                                         log_samples=True, progress=False, mesh=single_device_mesh())
        return cache[name]

    return get


def test_matches_the_harness_hf_model( exports, task_dir, jax_results):
    """Per-request log-likelihoods within 1e-4 of lm-eval's `hf` model, the same greedy flags, the same
    generations and identical metrics."""
    name = "substitution"  # novices through both frameworks (stock and drop models: test_import_pruned)
    ours = jax_results(name)
    ref = _hf_results(exports[name], task_dir)
    a, b = _per_request(ours, MC), _per_request(ref, MC)
    assert len(a) == LIMIT and all(len(x) == 4 for x in a)
    ll_ours, ll_ref = (np.array([[ll for ll, _ in x] for x in r]) for r in (a, b))
    assert np.abs(ll_ours - ll_ref).max() <= 1e-4
    assert [[g for _, g in x] for x in a] == [[g for _, g in x] for x in b]
    assert _per_request(ours, GEN) == _per_request(ref, GEN)
    assert any(x[0] for x in _per_request(ours, GEN))  # the model says something
    for task in (MC, GEN):
        assert ours["results"][task] == ref["results"][task] | {"alias": ours["results"][task]["alias"]}


def test_cli_on_a_2x4_mesh_gives_the_same_results(exports, task_dir, jax_results, tmp_path, capsys):
    """`mone-jax eval --tasks` (main() in this process, whose 8 CPU devices form a 2x4 (data, expert) mesh): the
    same metrics as one device; results.json in lm-eval's format and results.md written."""
    folder = exports["substitution"]
    capsys.readouterr()
    assert main(["eval", str(folder), "--tasks", f"{MC},{GEN}", "--include-path", str(task_dir), "--mesh",
                 "data=2,expert=4", "--batch-size", "8", "--out", str(tmp_path)]) == 0
    mesh_results = json.loads((tmp_path / "results.json").read_text())
    out, err = capsys.readouterr()
    assert MC in (tmp_path / "results.md").read_text() and MC in out
    # stderr, not a terminal: our lines only (lm-eval's log records among them), no bar, nothing from git
    assert all(line.startswith("mone-jax: ") for line in err.splitlines()) and "\r" not in err
    assert "fatal" not in err and f"score: {4 * LIMIT}/{4 * LIMIT} requests" in err  # 4 choices per document
    assert f"generate: {LIMIT}/{LIMIT} requests" in err
    one = jax_results("substitution")
    for task in (MC, GEN):
        assert mesh_results["results"][task] == json.loads(json.dumps(one["results"][task]))
    assert set(mesh_results) >= {"results", "configs", "versions", "n-shot", "config"}
    assert "samples" not in mesh_results


def test_generate_until_on_a_2x4_mesh_matches_one_device(exports, task_dir, jax_results):
    """`generate_until` with the model on 8 devices as a 2x4 (data, expert) mesh, each batch's rows split over
    them: the same generation for every request as on one device."""
    from mone_jax.app.harness import JaxLM

    lm = JaxLM(str(exports["substitution"]), mesh="data=2,expert=4", batch_size=8, progress=False)
    assert lm.scorer.mesh.size == 8
    ours = evaluate_tasks(lm, [GEN], include_path=str(task_dir), log_samples=True, progress=False)
    assert _per_request(ours, GEN) == _per_request(jax_results("substitution"), GEN)
