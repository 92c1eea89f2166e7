"""The paper's table end to end: released ViT-B/32 coefficients on the full-size architecture, and every row on a tiny pool."""
import math

import pandas as pd
import pytest
import torch

from adamerging_nb.baselines import released_lambdas
from adamerging_nb.methods import METHODS, run_methods
from adamerging_nb.evaluate import PAPER_METHODS, PAPER_ONLY, format_row, write_table
from adamerging_nb.merging import LayerWiseMergedModel
from adamerging_nb.models import ModelPool
from adamerging_nb.reference import TA8, official_lambdas, official_eval_log, official_layer_index
from adamerging_nb.testing import tiny_pool


@pytest.fixture
def one_thread():
    "Tiny models run fastest on one thread, especially on a shared machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vitb32():
    "The image encoder of a random-weight open_clip ViT-B/32 (QuickGELU), the architecture of the official checkpoints."
    open_clip = pytest.importorskip("open_clip")
    return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).visual.eval()


def released(method: str, key: str) -> torch.Tensor:
    "The released λ (8,) of `method` for the state-dict tensor `key`, looked up through the shipped index."
    idx = official_layer_index()
    layer = int(idx.loc[idx.state_dict_key == key, "layer"].item())
    co = official_lambdas().query("model == 'ViT-B-32' and method == @method and layer == @layer").set_index("task")
    return torch.tensor(co.loc[TA8, "lambda"].values, dtype=torch.float32)


CHECKED = ["conv1.weight", "positional_embedding", "class_embedding", "proj",
           "transformer.resblocks.5.attn.in_proj_weight", "transformer.resblocks.11.mlp.c_fc.bias", "ln_post.bias"]


def test_released_layerwise_coefficients_land_by_name(vitb32):
    names = [n for n, p in vitb32.named_parameters() if p.is_floating_point()]
    assert len(names) == 152  # 158 released rows minus the six text-side tensors
    for method in ("lw_adamerging", "lw_adamergingpp"):
        w = released_lambdas("ViT-B-32", method, names, TA8)  # the text rows are present and ignored
        assert w.shape == (8, 152)
        for n in CHECKED: torch.testing.assert_close(w[:, names.index(n)], released(method, "visual." + n))
    # the image encoder's positional embedding is row 4 (visual.), never row 0 (the text tower's, constant 0.3)
    w = released_lambdas("ViT-B-32", "lw_adamerging", names, TA8)
    assert not torch.allclose(w[:, names.index("positional_embedding")], released("lw_adamerging", "positional_embedding"))
    assert (released("lw_adamerging", "positional_embedding") == 0.3).all()


def test_released_coefficients_merge_the_named_tensors(vitb32):
    """Load the released λ into a layer-wise merged ViT-B/32 and check the merged tensors, tensor by tensor.

    Entry e of a checked tensor has task vector 1 for task e % 8 and 0 for the others, so the merged entry is
    θ₀ + λ[e % 8] of that tensor's row: every task's coefficient shows up. Task vectors are stored in bf16
    (exact for 0 and 1) to halve the memory; λ may be rounded to bf16 by the merge, hence the tolerance."""
    names = [n for n, p in vitb32.named_parameters() if p.is_floating_point()]
    shapes = {n: p.shape for n, p in vitb32.named_parameters()}
    tv = {n: torch.zeros((), dtype=torch.bfloat16).expand(8, *shapes[n]) for n in names}
    for n in CHECKED:
        task_of = torch.arange(shapes[n].numel()) % 8
        tv[n] = (task_of[None] == torch.arange(8)[:, None]).to(torch.bfloat16).view(8, *shapes[n])
    model = LayerWiseMergedModel(vitb32, task_vectors=tv, task_names=TA8, tv_dtype=torch.bfloat16)
    with torch.no_grad():
        model.merge_weight.copy_(released_lambdas("ViT-B-32", "lw_adamerging", model.layer_names, model.task_names))
        merged = model.merge(model.effective_lambdas())
    base = dict(vitb32.named_parameters())
    for n in CHECKED:
        lam = released("lw_adamerging", "visual." + n)
        task_of = torch.arange(shapes[n].numel()) % 8
        got = (merged[n].float() - base[n].detach()).flatten()
        torch.testing.assert_close(got, lam[task_of], rtol=0, atol=2 ** -8)
    torch.testing.assert_close(merged["ln_pre.weight"], base["ln_pre.weight"].detach())  # zero task vector: unchanged


def test_released_taskwise_and_other_models(vitb32):
    names = [n for n, _ in vitb32.named_parameters()]
    tw = released_lambdas("ViT-B-32", "tw_adamergingpp")
    assert tw.shape == (8,)
    co = official_lambdas().query("model == 'ViT-B-32' and method == 'tw_adamergingpp'").set_index("task")
    torch.testing.assert_close(tw, torch.tensor(co.loc[TA8, "lambda"].values, dtype=torch.float32))
    assert released_lambdas("ViT-B-16", "lw_adamerging", names).shape == (8, 152)  # same tensor names as ViT-B/32
    with pytest.raises(ValueError, match="tensors the model lacks"):
        released_lambdas("ViT-L-14", "lw_adamerging", names)  # 24 blocks: not this model
    with pytest.raises(ValueError, match="no λ for"):
        released_lambdas("ViT-B-32", "lw_adamerging", names + ["visual_extra.weight"])


def test_authors_log_prints_as_the_paper():
    lw = official_eval_log().query("method == 'lw_adamerging' and step == 500").set_index("task").accuracy[TA8]
    assert format_row(lw) == "64.5 68.1 79.2 93.8 87.0 91.9 97.5 59.1 | 80.1"


def ta8_tiny_pool() -> ModelPool:
    "The tiny problem with eight tasks named as the paper's."
    p = tiny_pool(n_tasks=8, n_images=8)
    ren = dict(zip(p.task_names, TA8))
    re = lambda d: {ren[t]: v for t, v in d.items()}
    return ModelPool("tiny-ta8", TA8, p.pretrained, re(p.finetuned), re(p.heads), re(p.test_sets), p.mean, p.std)


def test_every_row_on_a_pool_with_the_papers_tasks(tmp_path, one_thread):
    pool = ta8_tiny_pool()
    table, extras = run_methods(pool, steps=2, batch_size=8, paper_model="ViT-B-32", progress=False)
    measured = table[table.source == "measured"]
    assert measured.method.tolist() == METHODS
    assert table.method.tolist() == PAPER_METHODS  # the paper's twelve rows in its order; three with published numbers only
    assert set(table.method) - set(METHODS) == set(PAPER_ONLY)
    assert measured[TA8 + ["avg"]].notna().all().all() and measured[[f"paper_{t}" for t in TA8]].notna().all().all()
    row = table.set_index("method").loc["task_arithmetic"]
    assert row["paper_avg"] == 69.1 and math.isclose(row["diff_SVHN"], row["SVHN"] - 80.2, abs_tol=1e-9)
    csv, md = write_table(table, tmp_path / "results")
    assert pd.read_csv(csv).method.tolist() == table.method.tolist()
    text = open(md).read()
    assert all(f"| {m} |" in text for m in table.method) and "paper only (needs training data)" in text
    assert set(extras["accuracies"].method) == set(METHODS)
    traj = pd.concat(extras["trajectories"].values())
    assert list(traj.columns) == ["method", "step", "layer", "task", "lambda"] and set(traj.task) == set(TA8)
