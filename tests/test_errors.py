"""Failure modes of the command line (issue 8; the table is docs/failure_modes.md).

Every bad input gets one line ``mone-jax: error: ...`` on stderr, exit code 2, no traceback, and
leaves nothing behind; a killed or failing export leaves no folder that looks like a checkpoint;
nothing from an input folder is ever executed. The cases run ``main()`` in this process (a second run of
``main()`` reports what a second process would); a few run the installed command as a real subprocess: one
bad input, ``--debug``, a killed export and a full disk.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save, save_file

from mone_jax.base.errors import UserError
from mone_jax.base.stats import LayerStats, Stats
from mone_jax.convert.reader import CheckpointReader
from mone_jax.convert.writer import verify_export
from mone_jax.pruning.planning import Plan, make_plan, save_plan

E, TOP_K, HIDDEN, VOCAB = 8, 2, 32, 96  # tests/conftest.py's olmoe "a"
WORDS = "the a of and to in is it that was for on are with as be at by this had".split()


class Inputs:
    """The tiny OLMoE checkpoint, broken copies of it (built on first use) and data / stats / plan files."""

    def __init__(self, src: Path, root: Path):
        self.src, self.dir = src, root
        self._built: dict[str, Path] = {}

    def model(self, name: str = "ok") -> Path:
        if name == "ok":
            return self.src
        if name not in self._built:
            folder = self.dir / name
            shutil.copytree(self.src, folder)
            getattr(self, f"_{name}")(folder)
            self._built[name] = folder
        return self._built[name]

    @staticmethod
    def _config(folder: Path, **changes) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **changes}))

    @staticmethod
    def _tensors(folder: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    def _no_config(self, folder: Path) -> None:
        (folder / "config.json").unlink()

    def _llama(self, folder: Path) -> None:
        self._config(folder, model_type="llama")

    def _bad_type(self, folder: Path) -> None:
        self._config(folder, hidden_size="32x")

    def _top_k(self, folder: Path) -> None:
        self._config(folder, num_experts_per_tok=E + 1)

    def _zero_size(self, folder: Path) -> None:
        self._config(folder, hidden_size=0)

    def _lost_shard(self, folder: Path) -> None:
        keys = load_file(folder / "model.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
                            for i, k in enumerate(keys)}}))
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")

    def _pickle(self, folder: Path) -> None:
        """Weights only as a pickle that, if it were ever unpickled, would create ``pwned``."""
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(self.dir / "pwned")))

    def _truncated(self, folder: Path) -> None:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])

    def _garbage(self, folder: Path) -> None:
        (folder / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"\0" * 64)

    def _shape(self, folder: Path) -> None:
        self._config(folder, intermediate_size=24)

    def _missing(self, folder: Path) -> None:
        self._tensors(folder, lambda t: t.pop("model.layers.1.mlp.experts.3.down_proj.weight"))

    def _nan(self, folder: Path) -> None:
        def poison(t: dict[str, np.ndarray]) -> None:
            t["model.layers.0.mlp.experts.2.up_proj.weight"][3, 5] = np.nan

        self._tensors(folder, poison)

    def _overflow(self, folder: Path) -> None:
        """Finite weights whose expert outputs overflow float32: the statistics become Inf / NaN."""
        def blow_up(t: dict[str, np.ndarray]) -> None:
            for e in range(E):
                t[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] *= np.float32(1e37)

        self._tensors(folder, blow_up)

    def _custom_code(self, folder: Path) -> None:
        """auto_map pointing at a modeling file that would create ``pwned_code`` if it were ever imported."""
        self._config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
        (folder / "modeling_evil.py").write_text(f"open({str(self.dir / 'pwned_code')!r}, 'w').close()\n")

    def _tokenizer(self, folder: Path) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>", *WORDS])}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _stats(num_experts: int, seed: int = 0) -> Stats:
    rng = np.random.default_rng(seed)
    layers = {
        i: LayerStats(rng.integers(2, 20, num_experts), rng.random(num_experts), rng.normal(size=(num_experts, HIDDEN)),
                      rng.random((num_experts, HIDDEN)), rng.random(num_experts), rng.random(num_experts))
        for i in (0, 1)
    }
    return Stats(layers, 64, {"model_type": "olmoe", "num_experts": num_experts, "top_k": TOP_K})


@pytest.fixture(scope="module")
def inputs(hf_models, tmp_path_factory) -> Inputs:
    src, _ = hf_models("olmoe", "a")
    inp = Inputs(src, tmp_path_factory.mktemp("errors"))
    d, rng = inp.dir, np.random.default_rng(0)
    np.save(d / "ids.npy", rng.integers(0, VOCAB, (4, 16)).astype(np.int32))
    np.save(d / "empty.npy", np.zeros((0,), np.int32))
    np.save(d / "oov.npy", np.full((2, 16), VOCAB + 4, np.int32))
    np.save(d / "short.npy", rng.integers(0, VOCAB, 10).astype(np.int32))
    np.save(d / "stream.npy", rng.integers(0, VOCAB, 2000).astype(np.int32))
    (d / "tiny.txt").write_text("the cat sat on a mat\n")
    (d / "empty.txt").write_text("")
    good = _stats(E)
    good.save(d / "stats.safetensors")
    _stats(4).save(d / "stats_4_experts.safetensors")
    save_plan(make_plan(good, keep=4), d / "plan.json")
    save_plan(make_plan(_stats(4), keep=2), d / "plan_4_experts.json")
    uneven = make_plan(good, keep=4).to_dict()
    uneven["layers"]["1"] = {"kept": [0, 1, 2, 3, 4], "novices": [5, 6, 7]}
    save_plan(uneven, d / "plan_uneven.json")
    keeps_poisoned = make_plan(good, keep=4).to_dict()  # keeps the expert the "nan" model poisons
    keeps_poisoned["layers"]["0"] = {"kept": [0, 1, 2, 3], "novices": [4, 5, 6, 7]}
    save_plan(keeps_poisoned, d / "plan_keeps_poisoned.json")
    bad = _stats(E)
    bad.layers[1].mean[2, 7] = np.nan
    bad.save(d / "stats_nan.safetensors")
    (d / "not_empty").mkdir()
    (d / "not_empty" / "keep.txt").write_text("precious")
    return inp


def _prune(i: Inputs, o: Path, *extra, model: str = "ok", calib: str | None = "ids.npy",
           keep: tuple = ("--keep", "4"), out: Path | None = None, files: bool = True) -> list:
    """A ``prune`` command line writing ``o/out`` (or ``out``) and, with ``files``, the stats and plan into ``o``."""
    data = ("--calib", i.dir / calib) if calib else ()
    written = ("--stats-out", o / "stats.safetensors", "--plan-out", o / "plan.json") if files else ()
    return ["prune", i.model(model), *data, *keep, "--out", out or o / "out", *written, "--quiet", *extra]


# failure mode -> (command line from (inputs, output folder), words the message must contain)
CASES: dict[str, tuple[Callable[[Inputs, Path], list], str]] = {
    "model folder missing": (lambda i, o: ["prune", i.dir / "nope", "--calib", i.dir / "ids.npy", "--keep", "4",
                                           "--out", o / "out"], "does not exist"),
    "no config.json": (lambda i, o: _prune(i, o, model="no_config"), "has no config.json"),
    "unsupported model_type": (lambda i, o: _prune(i, o, model="llama"),
                               "model_type 'llama' is not supported. Supported: deepseek_v2, deepseek_v3"),
    "config value of the wrong type": (lambda i, o: _prune(i, o, model="bad_type"),
                                       "holds an invalid value (invalid literal for int()"),
    "config top-k > experts": (lambda i, o: _prune(i, o, model="top_k"), "routes each token to 9 of 8 experts"),
    "config size <= 0": (lambda i, o: _prune(i, o, model="zero_size"),
                         "gives hidden_size = 0, which must be positive"),
    "shard listed in the index missing": (lambda i, o: _prune(i, o, model="lost_shard"),
                                          "model-00002-of-00002.safetensors' listed in the index is missing"),
    "only pickle weights": (lambda i, o: _prune(i, o, model="pickle"), "only pickle weights (pytorch_model.bin)"),
    "truncated safetensors": (lambda i, o: _prune(i, o, model="truncated"), "is truncated or corrupted"),
    "corrupt safetensors header": (lambda i, o: _prune(i, o, model="garbage"), "is not a valid safetensors file"),
    "tensor shape vs config": (lambda i, o: _prune(i, o, model="shape"), "the weights do not belong to this config"),
    "missing tensor": (lambda i, o: _prune(i, o, model="missing"),
                       "tensor 'model.layers.1.mlp.experts.3.down_proj.weight' is missing from the checkpoint"),
    "NaN in weights": (lambda i, o: _prune(i, o, model="nan"),
                       "up_proj.weight' in '{dir}/nan' contains NaN or Inf values"),
    "NaN in weights, exported from --stats (no model load)": (
        lambda i, o: _prune(i, o, "--stats", i.dir / "stats.safetensors", "--plan", i.dir / "plan_keeps_poisoned.json",
                            model="nan", calib=None, keep=(), files=False),
        "up_proj.weight' in '{dir}/nan' contains NaN or Inf values"),
    "Inf/NaN in calibration statistics": (lambda i, o: _prune(i, o, model="overflow"),
                                          "calibration statistics of layer 0 contain NaN/Inf"),
    "NaN in a statistics file": (lambda i, o: ["plan", i.dir / "stats_nan.safetensors", "--keep", "4",
                                               "--plan-out", o / "plan.json"],
                                 "stats_nan.safetensors' holds NaN/Inf (layer 1 mean)"),
    "--keep 0": (lambda i, o: _prune(i, o, keep=("--keep", "0")), "--keep must be positive, got 0"),
    "--keep > experts": (lambda i, o: _prune(i, o, keep=("--keep", "9")), "keep must lie in [1, 8]"),
    "--keep > experts (plan)": (lambda i, o: ["plan", i.dir / "stats.safetensors", "--keep", "9",
                                              "--plan-out", o / "plan.json"], "keep must lie in [1, 8]"),
    "--ratio 1": (lambda i, o: _prune(i, o, keep=("--ratio", "1")), "ratio must lie in [0, 1)"),
    "--ratio < 0": (lambda i, o: _prune(i, o, keep=("--ratio", "-0.25")), "ratio must lie in [0, 1)"),
    "unknown metric": (lambda i, o: _prune(i, o, "--metric", "entropy"), "unknown metric 'entropy': use one of mone"),
    "unknown scope": (lambda i, o: _prune(i, o, "--scope", "global"), "unknown scope 'global': use one of layer"),
    "unknown format": (lambda i, o: _prune(i, o, "--format", "gguf"), "unknown export format 'gguf': use one of"),
    "drop + scope model": (lambda i, o: _prune(i, o, "--format", "drop", "--scope", "model"),
                           "--format drop needs the same number of experts in every layer"),
    "drop + uneven plan": (lambda i, o: _prune(i, o, "--format", "drop", "--stats", i.dir / "stats.safetensors",
                                               "--plan", i.dir / "plan_uneven.json", calib=None, keep=()),
                           "drop mode needs the same keep count in every layer"),
    "drop keeps < top-k": (lambda i, o: _prune(i, o, "--format", "drop", keep=("--keep", "1")),
                           "drop mode must keep at least top-k = 2"),
    "empty calibration data": (lambda i, o: _prune(i, o, calib="empty.npy"), "must hold non-empty integer token ids"),
    "empty text": (lambda i, o: _prune(i, o, model="tokenizer", calib="empty.txt"), "empty.txt is empty"),
    "fewer tokens than a block (npy)": (lambda i, o: _prune(i, o, "--seq-len", "16", calib="short.npy"),
                                        "holds 10 tokens, fewer than one block of 16"),
    "fewer tokens than a block (text)": (lambda i, o: _prune(i, o, "--seq-len", "64", model="tokenizer",
                                                             calib="tiny.txt"), "fewer than one block of 64"),
    "token ids outside the vocabulary": (lambda i, o: _prune(i, o, calib="oov.npy"),
                                         "token ids must lie in [0, 96), found 100..100"),
    "--seq-len > max positions": (lambda i, o: _prune(i, o, "--seq-len", "300", "--num-samples", "2",
                                                      calib="stream.npy"),
                                  "sequence length 300 exceeds the model's max_position_embeddings 256"),
    "text without a tokenizer": (lambda i, o: _prune(i, o, calib="tiny.txt"), "has no tokenizer files"),
    "output folder not empty": (lambda i, o: _prune(i, o, out=i.dir / "not_empty"),
                                "output folder '{dir}/not_empty' exists and is not empty"),
    "output folder is the model": (lambda i, o: _prune(i, o, "--overwrite", out=i.src),
                                   "would replace the model folder"),
    "--out is a file": (lambda i, o: _prune(i, o, out=i.dir / "ids.npy"), "is a file: give a folder"),
    "--stats-out is a folder": (lambda i, o: _prune(i, o, "--stats-out", i.dir), "is a folder: give a file name"),
    "--stats-out inside --out": (lambda i, o: _prune(i, o, "--stats-out", o / "s.safetensors", out=o, files=False),
                                 "lies inside --out"),
    "stats file of another model": (lambda i, o: _prune(i, o, "--stats", i.dir / "stats_4_experts.safetensors",
                                                        calib=None), "do not match the model (olmoe, 8 experts"),
    "plan file of another model": (lambda i, o: _prune(i, o, "--stats", i.dir / "stats.safetensors", "--plan",
                                                       i.dir / "plan_4_experts.json", calib=None, keep=()),
                                   "kept and novices must partition experts 0..7"),
    "not a statistics file": (lambda i, o: ["plan", i.dir / "ids.npy", "--keep", "4", "--plan-out", o / "p.json"],
                              "is not a valid statistics file"),
    "plan file missing": (lambda i, o: _prune(i, o, "--plan", i.dir / "nope.json", keep=()),
                          "plan file '{dir}/nope.json' does not exist"),
    "--plan with --keep": (lambda i, o: _prune(i, o, "--plan", i.dir / "plan.json"), "--plan fixes the kept experts"),
    "--stats with --calib": (lambda i, o: _prune(i, o, "--stats", i.dir / "stats.safetensors"),
                             "--stats reuses computed statistics: drop --calib"),
    "--batch-size 0": (lambda i, o: _prune(i, o, "--batch-size", "0"), "--batch-size must be positive"),
    "not a number": (lambda i, o: _prune(i, o, keep=("--keep", "four")), "argument --keep: invalid int value"),
}


def _cli(argv: list, **kw) -> subprocess.CompletedProcess:
    """The installed command as a user runs it: a new process."""
    return subprocess.run([sys.executable, "-m", "mone_jax.app.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.fixture
def cli(capsys) -> Callable[[list], subprocess.CompletedProcess]:
    """``main(argv)`` in this process, its exit code and output as a finished subprocess would report them."""
    from mone_jax.app.cli import main

    def run(argv: list) -> subprocess.CompletedProcess:
        capsys.readouterr()
        args = [str(a) for a in argv]
        try:
            code = main(args)
        except SystemExit as e:  # argparse's own exit
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def _check_refused(p: subprocess.CompletedProcess, expect: str, inputs: Inputs, out: Path) -> None:
    lines = [line for line in p.stderr.strip().splitlines() if "] check: " not in line]  # the first phase line
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith("mone-jax: error: "), p.stderr
    assert expect.format(dir=inputs.dir) in lines[0]
    assert list(out.iterdir()) == []  # no output folder, file or temporary sibling
    assert not (inputs.dir / "pwned").exists()  # the pickle was never unpickled
    assert (inputs.dir / "not_empty" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_written(case, inputs, tmp_path, cli):
    argv, expect = CASES[case]
    _check_refused(cli(argv(inputs, tmp_path)), expect, inputs, tmp_path)


@pytest.mark.slow
def test_bad_input_in_a_real_process(inputs, tmp_path):
    """The same contract from the installed entry point, for a pickle-only checkpoint (never unpickled)."""
    argv, expect = CASES["only pickle weights"]
    _check_refused(_cli(argv(inputs, tmp_path)), expect, inputs, tmp_path)


@pytest.mark.slow
def test_debug_shows_the_traceback(inputs, tmp_path):
    p = _cli(["--debug", *_prune(inputs, tmp_path, model="truncated")])
    assert p.returncode != 0 and "Traceback" in p.stderr and "UserError" in p.stderr


def test_custom_code_is_ignored_with_a_warning(inputs, tmp_path, cli):
    """auto_map and a modeling file in the input folder: warned about (without --quiet, which shows errors only),
    never imported; the run succeeds."""
    p = cli([a for a in _prune(inputs, tmp_path, model="custom_code") if a != "--quiet"])
    assert p.returncode == 0, p.stderr
    warning = [line for line in p.stderr.splitlines() if "custom code" in line]
    assert warning == [f"mone-jax: warning: '{inputs.model('custom_code')}' ships custom code (auto_map in "
                       "config.json, modeling_evil.py): ignored, mone-jax reads config.json as data and never runs "
                       "code from a model folder"]
    assert not (inputs.dir / "pwned_code").exists()
    assert verify_export(tmp_path / "out") == []
    assert "modeling_evil" not in (tmp_path / "out" / "config.json").read_text()


@pytest.mark.parametrize("keep, expect", [("6", "multiple of the router's n_group = 4"),
                                          ("4", "1 experts in each of the router's 4 groups, too few")])
def test_impossible_grouped_drop_refused_before_calibrating(hf_models, inputs, tmp_path, keep, expect, cli):
    """16 experts in 4 groups, 2 groups per token, top-k 4: a drop to 6 (or 4) per layer cannot keep the
    groups (or fill the top-k). Without --quiet a calibration would have printed its progress."""
    src, _ = hf_models("deepseek_v3", "grouped_yarn")
    p = cli(["prune", src, "--calib", inputs.dir / "ids.npy", "--keep", keep, "--format", "drop",
              "--out", tmp_path / "out", "--stats-out", tmp_path / "s.safetensors"])
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()  # the options are checked (phase line), nothing is loaded or calibrated
    assert p.stdout == "" and len(lines) == 2 and "] check: " in lines[0] and lines[1].startswith("mone-jax: error: ")
    assert expect in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_grouped_drop_plan_keeps_every_group(hf_models, tmp_path, cli):
    """prune --format drop on a group-limited router keeps the best keep / n_group of each group."""
    src, _ = hf_models("deepseek_v3", "grouped_yarn")  # MoE layer 1: 16 experts in 4 groups
    rng = np.random.default_rng(1)
    stats = Stats({1: LayerStats(rng.integers(2, 20, 16), rng.random(16), rng.normal(size=(16, HIDDEN)),
                                 rng.random((16, HIDDEN)), rng.random(16), rng.random(16))}, 64,
                      {"model_type": "deepseek_v3"})
    stats.layers[1].weight_sum[:8] += 10.0  # the best eight all lie in groups 0 and 1
    stats.save(tmp_path / "stats.safetensors")
    stats = Stats.load(tmp_path / "stats.safetensors")
    p = cli(["prune", src, "--stats", tmp_path / "stats.safetensors", "--keep", "8", "--format", "drop",
              "--out", tmp_path / "out", "--plan-out", tmp_path / "plan.json", "--quiet"])
    assert p.returncode == 0, p.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    for g in range(4):  # a float64 reference of the selection
        score = stats.layers[1].weight_sum[4 * g:4 * g + 4] / 64 * np.sqrt(stats.layers[1].var[4 * g:4 * g + 4].sum(1))
        want = sorted(4 * g + int(e) for e in np.argsort(-score, kind="stable")[:2])
        assert [e for e in plan["layers"]["1"]["kept"] if 4 * g <= e < 4 * g + 4] == want
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_routed_experts"] == 8


def test_reused_stats_and_plan(inputs, tmp_path, cli):
    """prune --stats / --plan: files of this model are used as given, without calibrating."""
    p = cli(_prune(inputs, tmp_path, "--stats", inputs.dir / "stats.safetensors", "--plan",
                    inputs.dir / "plan.json", calib=None, keep=()))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads((inputs.dir / "plan.json").read_text())
    assert verify_export(tmp_path / "out") == []


_SLOW_WRITER = """
import sys, time
import mone_jax.convert.export as ex
import mone_jax.convert.writer as wr
from mone_jax.app.cli import main
real = wr._write_shard
def first_then_hang(path, tensors):
    record = real(path, tensors)
    print("wrote", path.name, flush=True)
    time.sleep(300)
    return record
wr._write_shard = first_then_hang
ex.export_pruned.__kwdefaults__["max_shard_bytes"] = 20_000  # several shards
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_export_leaves_no_checkpoint(inputs, tmp_path):
    """SIGKILL after the first shard: no --out; the hidden temporary sibling is no checkpoint (no config.json,
    no manifest) and the next export to the same --out removes it."""
    argv = [str(a) for a in _prune(inputs, tmp_path, "--stats", inputs.dir / "stats.safetensors", "--plan",
                                   inputs.dir / "plan.json", calib=None, keep=(), files=False)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, *argv], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("wrote model-00001-of-")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not (tmp_path / "out").exists()
    (stale,) = tmp_path.glob(".out.tmp-*")
    names = {p.name for p in stale.iterdir()}
    assert names and all(n.endswith(".safetensors") for n in names)  # a shard or two, nothing else
    assert verify_export(stale) == ["mone_manifest.json is missing"]
    again = _cli(argv)
    assert again.returncode == 0, again.stderr
    assert verify_export(tmp_path / "out") == []
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.slow
def test_disk_full_mid_export_leaves_nothing(inputs, tmp_path):
    """A file size limit (like a full disk) makes the first shard fail: one line, exit code 1, no output."""
    argv = _prune(inputs, tmp_path, "--stats", inputs.dir / "stats.safetensors", "--plan", inputs.dir / "plan.json",
                  calib=None, keep=(), files=False)
    p = subprocess.run(["bash", "-c", 'ulimit -f 20 && exec "$@"', "-", sys.executable, "-m", "mone_jax.app.cli",
                        *map(str, argv)], capture_output=True, text=True, timeout=300)  # 20 KiB per file
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("mone-jax: error: File too large"), p.stderr
    assert list(tmp_path.iterdir()) == []


# Property tests: whatever a checkpoint header / index, statistics file or plan holds, reading it
# either works or raises UserError (one line in the CLI), never another exception.
_SCALARS = st.none() | st.booleans() | st.integers(-2, 40) | st.floats() | st.text(max_size=4)
_JSON = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=9) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                     max_leaves=12)
_ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I64", "X"]) | _JSON,
                                "shape": st.lists(st.integers(-2, 4), max_size=3) | _JSON,
                                "data_offsets": st.lists(st.integers(-8, 40), min_size=2, max_size=2) | _JSON})
_FILE = st.sampled_from(["model.safetensors", "../model.safetensors", ""]) | _JSON


@given(header=st.dictionaries(st.text(max_size=4), _ENTRY | _JSON, max_size=3) | _JSON, data=st.integers(0, 48),
       index=st.none() | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=4), _FILE, max_size=3)
                                                               | _JSON}) | _JSON)
def test_any_checkpoint_header_or_index_loads_or_gives_a_user_error(header, data, index):
    with tempfile.TemporaryDirectory() as d:
        raw = json.dumps(header).encode()
        (Path(d) / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * data)
        if index is not None:
            (Path(d) / "model.safetensors.index.json").write_text(json.dumps(index))
        try:
            with CheckpointReader(d) as r:
                for key in r.keys():
                    r.get(key)
        except UserError:
            pass


_STATS_NAMES = ["tokens", "layers.0.count", "layers.0.routing_weight_sum", "layers.0.output_mean",
                "layers.0.output_m2", "layers.0.reap_sum", "layers.0.output_norm_sum", "layers.1.count",
                "layers.x.count"]
_ARRAYS = st.builds(lambda shape, dtype, fill: np.full(shape, fill, np.float64).astype(dtype),
                    st.lists(st.integers(0, 3), max_size=2).map(tuple), st.sampled_from([np.float32, np.int64, np.uint8]),
                    st.sampled_from([0.0, 1.0, 2.5, -1.0]))


@given(tensors=st.dictionaries(st.sampled_from(_STATS_NAMES), _ARRAYS, max_size=8), junk=st.none() | st.binary(max_size=40))
def test_any_statistics_file_loads_or_gives_a_user_error(tensors, junk):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "s.safetensors").write_bytes(save(tensors) if junk is None else junk)
        try:
            Stats.load(Path(d) / "s.safetensors")
        except UserError:
            pass


_IDS = st.lists(st.integers(-1, 8), max_size=9) | _JSON


@given(plan=st.fixed_dictionaries({"layers": st.dictionaries(st.sampled_from(["0", "1", "x", "-1"]),
                                                             st.fixed_dictionaries({"kept": _IDS, "novices": _IDS})
                                                             | _JSON, max_size=3) | _JSON}) | _JSON,
       drop=st.booleans())
def test_any_plan_is_accepted_or_gives_a_user_error(plan, drop, olmoe_config):
    try:
        Plan.from_dict(plan).validate(olmoe_config, "drop" if drop else "substitute")
    except UserError:
        pass


@pytest.fixture(scope="module")
def olmoe_config(inputs):
    from mone_jax.convert.load import config_of

    return config_of(inputs.src)
