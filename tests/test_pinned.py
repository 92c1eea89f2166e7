"""Published settings pinned value by value, and the paths that only run at full size exercised at small size.

Each test here guards a slip that the end-to-end tests cannot see; `tools/mutants.py` plants those slips.
"""
import inspect, itertools
from dataclasses import asdict
import open_clip
import pytest
import torch
from adamerging_nb.adamerging import RECIPES, Recipe, adamerge
from adamerging_nb.baselines import task_arithmetic, ties_merging
from adamerging_nb.data import OPENAI_MEAN, OPENAI_STD, normalize
from adamerging_nb.engine import DeviceSampler, adamerge_fast, engine_step, lambda_grad
from adamerging_nb.losses import entropy_loss, head_logits
from adamerging_nb.merging import LayerWiseMergedModel, TaskWiseMergedModel
from adamerging_nb.methods import merged_wrapper, pool_storage
from adamerging_nb.task_vectors import task_vectors, ties_elect, ties_task_vectors, ties_trim
from adamerging_nb.testing import tiny_pool, tiny_setup

# ---- the two published recipes (sources: the markdown cell beside `Recipe` in nbs/09_adamerging.ipynb)

PAPER = dict(steps=500, batches_per_task=2, batch_size=16, lr=1e-3, betas=(0.9, 0.999), clamp_lambdas=True, init_lambdas=0.3)
FUSIONBENCH = dict(steps=1000, batches_per_task=1, batch_size=16, lr=1e-3, betas=(0.9, 0.999), clamp_lambdas=False, init_lambdas=0.3)

@pytest.mark.parametrize("name,want", [("paper", PAPER), ("fusionbench", FUSIONBENCH)])
def test_published_recipes_value_by_value(name, want):
    got = asdict(RECIPES[name])
    assert set(got) == set(want), f"Recipe fields changed: {sorted(got)}; pin the new ones here"
    for k, v in want.items(): assert got[k] == v, f"{name}.{k} is {got[k]!r}, the published value is {v!r}"
    assert Recipe() == RECIPES["paper"]  # the defaults are the official code's

def test_the_optimiser_uses_the_recipe_betas():
    "Two steps of the reference loop with unusual betas, replayed by hand with torch's Adam on the run's own gradients."
    s = tiny_setup(n_tasks=2, n_images=8)
    m = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    w = m.merge_weight.detach().clone().requires_grad_(True)
    grads = {}
    r = Recipe(steps=2, batches_per_task=1, batch_size=4, lr=0.05, betas=(0.5, 0.6))
    adamerge(m, s.heads, {t: itertools.cycle(s.images[t].split(4)) for t in s.task_names}, r, log_every=1, progress=False,
             callback=lambda step, mod: grads.update({step: None if mod.merge_weight.grad is None else mod.merge_weight.grad.clone()}))
    opt = torch.optim.Adam([w], lr=0.05, betas=(0.5, 0.6))
    for step in (1, 2): w.grad = grads[step]; opt.step()
    torch.testing.assert_close(m.merge_weight.detach(), w.detach())

# ---- the chunked λ-gradient path, at small size through `max_elems`

def _slow_lambda_grad(m, grads):
    tv = m.task_vectors()
    return torch.stack([torch.stack([(tv[n][k] * g).sum() for n, g in zip(m.layer_names, grads)]) for k in range(m.n_tasks)])

@pytest.mark.parametrize("max_elems", [1, 700, 3000, 1 << 25])
def test_lambda_grad_in_chunks_matches_layer_by_layer(max_elems):
    s = tiny_setup(n_tasks=3)
    m = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(v.shape[1:], generator=gen) for v in m.task_vectors().values()]  # ∂L/∂θ per layer
    assert len(m.groups[0]) == 17  # at max_elems=700: chunks of 7, 7 and 3 layers; at 1: one layer per kernel
    torch.testing.assert_close(lambda_grad(m, grads, max_elems=max_elems), _slow_lambda_grad(m, grads), rtol=1e-5, atol=1e-6)

# ---- AdaMerging++ on a pool with TIES padding

def test_adamergingpp_uses_the_pool_ties_padding():
    pool = tiny_pool(n_tasks=3, n_images=8)
    pool.ties_padding = 20_000  # like the Task Arithmetic pools: zeros beside the image tower
    tv = task_vectors(pool.pretrained, [pool.finetuned[t] for t in pool.task_names])
    want = ties_task_vectors({k: v.clone() for k, v in tv.items()}, ties_padding=pool.ties_padding)
    unpadded = ties_task_vectors({k: v.clone() for k, v in tv.items()})
    assert any(not torch.equal(want[k], unpadded[k]) for k in want)  # the padding matters at this size
    got = merged_wrapper(pool, "lw_adamergingpp", RECIPES["paper"]).task_vectors()
    for k in want: torch.testing.assert_close(got[k], want[k])
    assert pool_storage(pool, "ties").task_vectors().keys() == want.keys()

def test_ties_trim_with_padding_keeps_the_top_of_the_padded_length():
    flat = torch.tensor([[5., -4., 3., -2., 1., 0.5, 0.25, -0.125]])
    # official topk_values_mask: threshold = the (d - int(d * density))-th smallest magnitude over the padded length, kept if >=
    # padded: d = 8 + 12 = 20, the 16th smallest of 12 zeros and the 8 magnitudes is 1
    torch.testing.assert_close(ties_trim(flat, 0.2, ties_padding=12), torch.tensor([[5., -4., 3., -2., 1., 0., 0., 0.]]))
    # unpadded: d = 8, the 6th smallest magnitude is 3
    torch.testing.assert_close(ties_trim(flat, 0.25, ties_padding=0), torch.tensor([[5., -4., 3., 0., 0., 0., 0., 0.]]))

# ---- the trajectory: effective λ, and the default cadence

def _fast_run(clamp=True, lr=1e-3, steps=10, **kw):
    s = tiny_setup(n_tasks=2, n_images=8)
    m = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names, clamp_weights=clamp)
    u8 = {t: (s.images[t].clamp(-2, 2) * 60 + 128).to(torch.uint8) for t in s.task_names}
    smp = {t: DeviceSampler(u8[t], 4, seed=i) for i, t in enumerate(s.task_names)}
    r = Recipe(steps=steps, batches_per_task=1, batch_size=4, lr=lr, clamp_lambdas=clamp)
    return m, adamerge_fast(m, s.heads, smp, r, progress=False, cuda_graph=False, **kw)

def _ref_run(lr=1e-3, steps=10, **kw):
    s = tiny_setup(n_tasks=2, n_images=8)
    m = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    feeds = {t: itertools.cycle(s.images[t].split(4)) for t in s.task_names}
    return m, adamerge(m, s.heads, feeds, Recipe(steps=steps, batches_per_task=1, batch_size=4, lr=lr), progress=False, **kw)

@pytest.mark.parametrize("run", [_fast_run, _ref_run])
def test_trajectory_logs_the_effective_lambdas(run):
    m, res = run(lr=0.5, steps=4, log_every=2)
    raw = res.lambdas
    assert ((raw < 0) | (raw > 1)).any(), "the test needs λ outside [0, 1]"
    last = res.trajectory[res.trajectory.step == 4].pivot(index="task", columns="layer", values="lambda").loc[m.task_names]
    torch.testing.assert_close(torch.tensor(last.values, dtype=torch.float32), raw.clamp(0, 1))

@pytest.mark.parametrize("run", [_fast_run, _ref_run])
def test_default_logging_cadence_is_ten_steps(run):
    _, res = run(steps=20)
    assert sorted(set(res.trajectory.step)) == [0, 10, 20]

# ---- entropy

def test_entropy_of_very_confident_predictions_is_finite():
    logits = torch.tensor([[0., 200., -300.], [1000., -1000., 0.]], requires_grad=True)  # softmax underflows to exact zeros
    h = entropy_loss(logits)
    assert torch.isfinite(h) and h.item() == pytest.approx(0, abs=1e-6)
    (g,) = torch.autograd.grad(h, logits)
    assert torch.isfinite(g).all()

@pytest.mark.parametrize("C", [2, 5, 11])
def test_entropy_sums_over_classes_and_averages_over_the_batch(C):
    uniform = torch.zeros(3, C)
    assert entropy_loss(uniform).item() == pytest.approx(torch.log(torch.tensor(float(C))).item(), rel=1e-5)
    mixed = torch.cat([torch.zeros(1, C), torch.tensor([[100.] + [0.] * (C - 1)])])  # log C and 0: the mean is log C / 2
    assert entropy_loss(mixed).item() == pytest.approx(torch.log(torch.tensor(float(C))).item() / 2, rel=1e-5)

# ---- clamps, sums, normalisation, zero_grad: a second, independent check each

def test_task_wise_clamp_in_the_forward_pass():
    s = tiny_setup(n_tasks=3)
    m = TaskWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    with torch.no_grad(): m.merge_weight.copy_(torch.tensor([-0.5, 0.4, 1.7]))
    eff = m.effective_lambdas()
    torch.testing.assert_close(eff, torch.tensor([0., 0.4, 1.])[:, None].expand(3, len(m.layer_names)))
    m.merge_weight.grad = None
    eff.sum().backward()
    torch.testing.assert_close(m.merge_weight.grad, torch.tensor([0., len(m.layer_names), 0.]))

def _init_entropies(s, m, x):
    with torch.no_grad(): return torch.stack([entropy_loss(head_logits(m(x[t]), s.heads[t])) for t in s.task_names])

def test_task_losses_are_summed_in_both_loops():
    s = tiny_setup(n_tasks=3, n_images=4)
    x = {t: s.images[t] for t in s.task_names}
    m = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    want = _init_entropies(s, m, x)
    r = Recipe(steps=1, batches_per_task=1, batch_size=4)
    res = adamerge(m, s.heads, {t: itertools.repeat(x[t]) for t in s.task_names}, r, progress=False)
    assert res.losses[0] == pytest.approx(want.sum().item(), rel=1e-5)
    m = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    per_task = engine_step(m, [s.heads[t] for t in s.task_names], [x[t] for t in s.task_names], 4)
    torch.testing.assert_close(per_task, want, rtol=1e-5, atol=1e-6)
    loss = sum(entropy_loss(head_logits(m(x[t]), s.heads[t])) for t in s.task_names)
    torch.testing.assert_close(m.merge_weight.grad, torch.autograd.grad(loss, m.merge_weight)[0], rtol=1e-4, atol=1e-7)

def test_clip_normalisation_constants_are_open_clip_s():
    assert tuple(OPENAI_MEAN) == tuple(open_clip.OPENAI_DATASET_MEAN) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(OPENAI_STD) == tuple(open_clip.OPENAI_DATASET_STD) == (0.26862954, 0.26130258, 0.27577711)
    img = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    want = (img.float() / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(img), want)

def test_reference_loop_gradient_is_of_the_current_step_only():
    s = tiny_setup(n_tasks=2, n_images=8)
    m = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    xs = {t: s.images[t].split(4) for t in s.task_names}
    seen = {}
    def cb(step, mod):
        seen[step] = (mod.merge_weight.detach().clone(), None if mod.merge_weight.grad is None else mod.merge_weight.grad.clone())
    adamerge(m, s.heads, {t: itertools.cycle(xs[t]) for t in s.task_names}, Recipe(steps=2, batches_per_task=1, batch_size=4, lr=0.01),
             log_every=1, progress=False, callback=cb)
    m1 = LayerWiseMergedModel(s.pretrained, s.finetuned, task_names=s.task_names)
    with torch.no_grad(): m1.merge_weight.copy_(seen[1][0])  # λ after step 1; step 2 sees each task's second batch
    loss = sum(entropy_loss(head_logits(m1(xs[t][1]), s.heads[t])) for t in s.task_names)
    torch.testing.assert_close(seen[2][1], torch.autograd.grad(loss, m1.merge_weight)[0], rtol=1e-4, atol=1e-7)

# ---- merges against plain, independent arithmetic

def test_head_logits_normalise_the_features():
    s = tiny_setup(n_tasks=1)
    f = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    h = s.heads["task0"]
    torch.testing.assert_close(head_logits(7.5 * f, h), head_logits(f, h))
    torch.testing.assert_close(head_logits(f, h), (f / f.norm(dim=-1, keepdim=True)) @ h.T)

@pytest.mark.parametrize("cls", [TaskWiseMergedModel, LayerWiseMergedModel])
def test_one_task_at_one_is_that_finetuned_model(cls):
    s = tiny_setup(n_tasks=3)
    m = cls(s.pretrained, s.finetuned, task_names=s.task_names)
    with torch.no_grad(): m.merge_weight.copy_(torch.tensor([0., 1., 0.]).view(3, *[1] * (m.merge_weight.ndim - 1)).expand_as(m.merge_weight))
    got, want = m.merge_and_unload().state_dict(), s.finetuned[1].state_dict()
    for k in want: torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

def test_wrappers_take_the_recipe_clamp_and_init():
    pool = tiny_pool(n_tasks=2, n_images=4)
    for name in ("tw_adamerging", "lw_adamergingpp"):
        m = merged_wrapper(pool, name, RECIPES["fusionbench"])
        assert m.clamp_weights is False and torch.all(m.merge_weight == 0.3)
        m = merged_wrapper(pool, name, Recipe(init_lambdas=0.7))
        assert m.clamp_weights is True and torch.all(m.merge_weight == 0.7)

def test_baselines_at_the_paper_settings():
    assert inspect.signature(task_arithmetic).parameters["lambdas"].default == 0.3
    assert inspect.signature(ties_merging).parameters["lambdas"].default == 0.3
    assert inspect.signature(ties_merging).parameters["density"].default == 0.2
    s = tiny_setup(n_tasks=3)
    base = s.pretrained.state_dict()
    ta = task_arithmetic(s.pretrained, s.finetuned)
    for k, v in base.items():
        if v.is_floating_point(): torch.testing.assert_close(ta[k], v + 0.3 * sum(f.state_dict()[k] - v for f in s.finetuned))
    tv = task_vectors(s.pretrained, s.finetuned)
    ties = ties_task_vectors({k: v.clone() for k, v in tv.items()}, ties_padding=5000)
    tm = ties_merging(s.pretrained, s.finetuned, ties_padding=5000)
    for k in ties: torch.testing.assert_close(tm[k], base[k] + 0.3 * ties[k].sum(0))

def test_ties_elect_breaks_ties_with_the_majority_sign():
    trimmed = torch.tensor([[1., -1., 2., 0.], [-1., 1., 1., 0.]])  # sums 0, 0, 3, 0: the majority of the elected signs is +
    torch.testing.assert_close(ties_elect(trimmed), torch.tensor([1., 1., 1., 1.]))
    torch.testing.assert_close(ties_elect(-trimmed), torch.tensor([-1., -1., -1., -1.]))

@pytest.mark.parametrize("cls", [TaskWiseMergedModel, LayerWiseMergedModel])
def test_engine_entropy_per_batch_and_gradient_through_the_clamp(cls):
    "Two batches per task, λ partly outside [0, 1]: the engine against autograd through the wrapper's forward."
    s = tiny_setup(n_tasks=3, n_images=8)
    m = cls(s.pretrained, s.finetuned, task_names=s.task_names)
    with torch.no_grad(): m.merge_weight.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(1))
    x = {t: s.images[t] for t in s.task_names}
    per_task = engine_step(m, [s.heads[t] for t in s.task_names], [x[t] for t in s.task_names], 4)
    want = [sum(entropy_loss(head_logits(m(b), s.heads[t])) for b in x[t].split(4)) for t in s.task_names]
    torch.testing.assert_close(per_task, torch.stack(want).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.merge_weight.grad, torch.autograd.grad(sum(want), m.merge_weight)[0], rtol=1e-4, atol=1e-7)
