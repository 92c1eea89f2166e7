"""Fault injection: every fault the project guards against, with the message a user sees and what survives.

Faults: a run killed mid-way (resumed from its checkpoint), a non-finite loss, an empty loader, tasks that disagree,
checkpoints of different architectures, merging weights of the wrong tasks/layers/shape, corrupt or truncated
checkpoint, cache and weights files, a pickle asking for a disallowed global, an output folder holding another run,
and a write interrupted half-way.
"""
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import json, pickle, signal, subprocess, sys, textwrap
from pathlib import Path
import pandas as pd
import pytest
import torch

from adamerging_nb.adamerging import get_recipe, save_lambdas, load_lambdas, NonFiniteError
from adamerging_nb.methods import merge_pool, merged_wrapper
from adamerging_nb import data
from adamerging_nb.data import InfiniteDataLoader, save_cache, load_cache, CacheError
from adamerging_nb.engine import DeviceSampler, adamerge_fast, load_checkpoint
from adamerging_nb.merging import LayerWiseMergedModel
from adamerging_nb.archives import read_torch_archive
from adamerging_nb.models import ModelPool
from adamerging_nb.runs import claim_output, write_atomic, save_run, run_config
from adamerging_nb.task_vectors import task_vectors
from adamerging_nb.testing import tiny_pool, tiny_encoder

ROOT = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from adamerging_nb.testing import tiny_pool
    from adamerging_nb.adamerging import get_recipe
    from adamerging_nb.methods import merged_wrapper
    from adamerging_nb.engine import DeviceSampler, adamerge_fast
    ck, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pool = tiny_pool(); r = get_recipe("paper", steps=16, batch_size=4, batches_per_task=1)
    model = merged_wrapper(pool, "lw_adamerging", r)
    smp = {t: DeviceSampler(pool.test_sets[t].images, 4, seed=i) for i, t in enumerate(pool.task_names)}
    def killer(step, m):
        if step == kill_at: os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers
    res = adamerge_fast(model, pool.heads, smp, r, log_every=2, checkpoint=ck, checkpoint_every=4, resume=True, callback=killer, progress=False)
    torch.save({"lambdas": res.lambdas, "lambda": torch.tensor(res.trajectory["lambda"].values), "losses": torch.tensor(res.losses)}, out)
""")


def run(*args):
    return subprocess.run([sys.executable, "-c", RUN, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_run_resumes_bit_identical(tmp_path):
    full = run(tmp_path / "a.pt", -1, tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr
    killed = run(tmp_path / "b.pt", 10, tmp_path / "never.pt")
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "never.pt").exists()
    assert load_checkpoint(tmp_path / "b.pt", {})["step"] == 8  # the last checkpoint before the kill
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written checkpoint
    resumed = run(tmp_path / "b.pt", -1, tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    for k in a: assert torch.equal(a[k], b[k]), k


def test_same_seed_same_lambda():
    pool = tiny_pool()
    a = merge_pool(pool, "lw_adamerging", steps=6, batch_size=4, seed=3, progress=False)[1]
    b = merge_pool(pool, "lw_adamerging", steps=6, batch_size=4, seed=3, progress=False)[1]
    c = merge_pool(pool, "lw_adamerging", steps=6, batch_size=4, seed=4, progress=False)[1]
    assert torch.equal(a.lambdas, b.lambdas) and not torch.equal(a.lambdas, c.lambdas)


def test_non_finite_loss_names_step_and_task_and_keeps_last_good(tmp_path):
    pool = tiny_pool()
    pool.heads["task1"] = pool.heads["task1"].clone(); pool.heads["task1"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 1 on task 'task1'.*saved in"):
        merge_pool(pool, "lw_adamerging", steps=6, batch_size=4, log_every=2, checkpoint_dir=tmp_path, progress=False)
    st = load_checkpoint(tmp_path / "lw_adamerging-seed0.safetensors", {})
    assert st["step"] == 0 and torch.isfinite(st["merge_weight"]).all()


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="yields no batch"): next(InfiniteDataLoader([]))
    with pytest.raises(ValueError, match="empty test set"): DeviceSampler(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))


def test_tasks_that_disagree():
    p = tiny_pool()
    with pytest.raises(ValueError, match=r"the heads are for tasks \['task0', 'task1'\]"):
        ModelPool("bad", p.task_names, p.pretrained, p.finetuned, {t: p.heads[t] for t in p.task_names[:2]}, p.test_sets)


def test_checkpoints_of_different_architectures():
    with pytest.raises(ValueError, match="other shapes"):
        task_vectors(tiny_encoder(), [tiny_encoder(width=48)])
    with pytest.raises(ValueError, match="missing"):
        task_vectors(tiny_encoder(), [tiny_encoder(layers=1)])


def test_merging_weights_of_wrong_tasks_layers_shape(tmp_path):
    p = tiny_pool(); r = get_recipe("paper")
    lw = merged_wrapper(p, "lw_adamerging", r)
    save_lambdas(tmp_path / "w.safetensors", lw)
    tw = merged_wrapper(p, "tw_adamerging", r)
    with pytest.raises(ValueError, match="shape"): load_lambdas(tmp_path / "w.safetensors", tw)
    other = LayerWiseMergedModel(p.pretrained, [p.finetuned[t] for t in p.task_names], task_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="for tasks"): load_lambdas(tmp_path / "w.safetensors", other)
    with pytest.raises(ValueError, match="λ of shape"):
        merge_pool(p, "lw_adamerging", lambdas=torch.zeros(3, 2))


def test_corrupt_or_truncated_files(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "ck.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ck.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match="corrupt or truncated"): read_torch_archive(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="corrupt or truncated"): load_checkpoint(tmp_path / "cut.pt", {})
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a λ file"): load_lambdas(tmp_path / "w.safetensors", merged_wrapper(tiny_pool(), "tw_adamerging", get_recipe()))
    ts = data.TestSet("MNIST", torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), torch.arange(4))
    path = save_cache(ts, tmp_path / "cache", source="hf")
    imgs = next(f for f in path.iterdir() if f.suffix == ".npy" and "image" in f.name)
    imgs.write_bytes(imgs.read_bytes()[:50])
    with pytest.raises(CacheError): load_cache(path)


def test_pickle_asking_for_a_disallowed_global(tmp_path):
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {tmp_path / 'pwned'}",))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    torch.save(Evil(), tmp_path / "evil_zip.pt")
    for f in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(ValueError, match="system|legacy"): read_torch_archive(tmp_path / f)
    assert not (tmp_path / "pwned").exists()


def test_output_folder_holding_another_run(tmp_path):
    out = claim_output(tmp_path / "run", {"pool": "tiny", "seed": 0}).path  # released when collected
    write_atomic(out / "results.csv", "method,avg\nx,1\n")
    with pytest.raises(FileExistsError, match=r"parameters differ: \['seed'\]"):
        claim_output(out, {"pool": "tiny", "seed": 1})
    assert (out / "results.csv").read_text() == "method,avg\nx,1\n"  # nothing earlier was touched


RESUME_EVAL = textwrap.dedent("""
    import os, signal, sys, json
    import adamerging_nb.engine as engine
    from adamerging_nb.testing import tiny_pool
    from adamerging_nb.methods import merge_pool
    ck, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real = engine.trajectory_rows
    def rows(model, step):  # logged every log_every steps: the place to die
        if step == kill_at: os.kill(os.getpid(), signal.SIGKILL)
        return real(model, step)
    engine.trajectory_rows = rows
    _, res = merge_pool(tiny_pool(), "lw_adamerging", steps=12, batch_size=4, log_every=2, eval_every=2, checkpoint_dir=ck,
                        checkpoint_every=4, resume=True, progress=False)
    res.eval_log.to_csv(out, index=False)
""")


def test_resumed_run_keeps_the_evaluations_of_its_first_part(tmp_path):
    go = lambda *a: subprocess.run([sys.executable, "-c", RESUME_EVAL, *map(str, a)], capture_output=True, text=True, cwd=ROOT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    full = go(tmp_path / "a", -1, tmp_path / "full.csv"); assert full.returncode == 0, full.stderr
    killed = go(tmp_path / "b", 10, tmp_path / "never.csv"); assert killed.returncode == -signal.SIGKILL
    resumed = go(tmp_path / "b", -1, tmp_path / "resumed.csv"); assert resumed.returncode == 0, resumed.stderr
    a, b = pd.read_csv(tmp_path / "full.csv"), pd.read_csv(tmp_path / "resumed.csv")
    assert sorted(b.step.unique()) == [0, 2, 4, 6, 8, 10, 12] and a.equals(b)


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    write_atomic(tmp_path / "results.csv", "old\n")
    def boom(*a, **k): raise KeyboardInterrupt("interrupted between write and rename")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt): write_atomic(tmp_path / "results.csv", "new, half-written\n")
    monkeypatch.undo()
    assert (tmp_path / "results.csv").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # the temporary file was removed


def _flip_in_tensor(path, key):
    "Flip one bit inside the bytes of the state entry `key` of a `save_state` file."
    raw = bytearray(Path(path).read_bytes())
    n = int.from_bytes(raw[:8], "little"); header = json.loads(raw[8:8 + n])
    desc = json.loads(header["__metadata__"]["state"])
    name = next(v["tensor"] for k, v in desc["dict"] if k == {"value": key})
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start + 1] ^= 0x01
    Path(path).write_bytes(bytes(raw))


def test_checkpoint_of_another_pool_with_the_same_names_is_refused(tmp_path):
    a, b = tiny_pool(seed=0), tiny_pool(seed=1)
    assert (a.name, a.task_names) == (b.name, b.task_names)  # same names, other weights
    kw = dict(steps=4, batch_size=4, log_every=2, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    merge_pool(a, "lw_adamerging", **kw)
    with pytest.raises(ValueError, match=r"belongs to another run \(weights: '[0-9a-f]+' in the file"):
        merge_pool(b, "lw_adamerging", resume=True, **kw)
    _, res = merge_pool(a, "lw_adamerging", resume=True, **kw)  # its own pool resumes (here: already finished)
    assert res.lambdas.shape == (3, len(res.layer_names))


def test_a_flipped_bit_in_a_checkpoint_is_refused(tmp_path):
    p = tiny_pool()
    kw = dict(steps=4, batch_size=4, log_every=2, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    merge_pool(p, "lw_adamerging", **kw)
    ck = tmp_path / "lw_adamerging-seed0.safetensors"
    _flip_in_tensor(ck, "merge_weight")
    with pytest.raises(ValueError, match="cannot be trusted.*does not match its checksum"):
        merge_pool(p, "lw_adamerging", resume=True, **kw)
