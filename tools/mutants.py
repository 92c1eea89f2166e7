"""Plant bugs in the package one at a time and check that the tests catch each (`make mutants`).

Each mutant is an exact-string replacement in one exported module (`adamerging_nb/*.py`), asserted to match exactly
once, so this list fails loudly when the code changes. The package is copied to a temporary folder, the copy is
mutated, and the mutant's targeted tests run with that copy first on PYTHONPATH; the working tree is never touched.
A mutant is caught when its tests fail (or error). Equivalent mutants (no observable change) are listed apart and
left out of the score.

    python tools/mutants.py [--only ID ...] [--list]
"""
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = "tests/test_pinned.py"

def t(*names): return [f"{PIN}::{n}" for n in names]  # targeted tests of tests/test_pinned.py

# (id, module, old, new, tests, equivalent)
MUTANTS = [
    # losses
    ("entropy-eps-outside-log", "losses", "torch.log(p + 1e-8)", "(torch.log(p) + 1e-8)",
     t("test_entropy_of_very_confident_predictions_is_finite"), False),
    ("entropy-mean-over-classes", "losses", ").sum(dim=-1).mean()", ").mean(dim=-1).mean()",
     t("test_entropy_sums_over_classes_and_averages_over_the_batch"), False),
    ("entropy-sum-over-batch", "losses", ").sum(dim=-1).mean()", ").sum(dim=-1).sum()",
     t("test_entropy_sums_over_classes_and_averages_over_the_batch"), False),
    ("head-features-not-normalised", "losses", "return (features / features.norm(dim=-1, keepdim=True)) @", "return features @",
     t("test_head_logits_normalise_the_features"), False),
    # task_vectors
    ("task-vector-sign", "task_vectors", "torch.stack([sd[k] - v for sd in sds])", "torch.stack([v - sd[k] for sd in sds])",
     t("test_one_task_at_one_is_that_finetuned_model", "test_baselines_at_the_paper_settings"), False),
    ("ties-padding-ignored-in-length", "task_vectors", "d = flat.shape[1] + ties_padding", "d = flat.shape[1]",
     t("test_ties_trim_with_padding_keeps_the_top_of_the_padded_length", "test_adamergingpp_uses_the_pool_ties_padding"), False),
    ("ties-threshold-strict", "task_vectors", "flat * (flat.abs() >= thresh)", "flat * (flat.abs() > thresh)",
     t("test_ties_trim_with_padding_keeps_the_top_of_the_padded_length"), False),
    ("ties-elect-minority", "task_vectors", "return torch.where(sign == 0, majority, sign)", "return torch.where(sign == 0, -majority, sign)",
     t("test_ties_elect_breaks_ties_with_the_majority_sign"), False),
    ("ties-select-keeps-zeros", "task_vectors", "torch.where(sign > 0, trimmed > 0, trimmed < 0)", "torch.where(sign > 0, trimmed >= 0, trimmed < 0)",
     t("test_baselines_at_the_paper_settings"), True),  # a kept zero entry adds zero: equivalent
    # merging
    ("merge-subtracts", "merging", "out.append(base + torch.bmm(", "out.append(base - torch.bmm(",
     t("test_one_task_at_one_is_that_finetuned_model"), False),
    ("layer-wise-no-clamp", "merging", "return self.merge_weight.clamp(0, 1) if self.clamp_weights else self.merge_weight", "return self.merge_weight",
     t("test_trajectory_logs_the_effective_lambdas"), False),
    ("task-wise-no-clamp", "merging", "w = self.merge_weight.clamp(0, 1) if self.clamp_weights else self.merge_weight", "w = self.merge_weight",
     t("test_task_wise_clamp_in_the_forward_pass"), False),
    ("sharing-ignores-clamp", "merging", "m.clamp_weights = clamp_weights", "m.clamp_weights = True",
     t("test_wrappers_take_the_recipe_clamp_and_init"), False),
    # adamerging: the recipes
    ("recipe-betas-swapped", "adamerging", "betas: tuple = (0.9, 0.999)", "betas: tuple = (0.999, 0.9)",
     t("test_published_recipes_value_by_value"), False),
    ("recipe-init", "adamerging", "init_lambdas: float = 0.3", "init_lambdas: float = 0.2",
     t("test_published_recipes_value_by_value"), False),
    ("paper-batches", "adamerging", "Recipe(steps=500, batches_per_task=2,", "Recipe(steps=500, batches_per_task=1,",
     t("test_published_recipes_value_by_value"), False),
    ("paper-lr", "adamerging", "batch_size=16, lr=1e-3, clamp_lambdas=True)", "batch_size=16, lr=1e-4, clamp_lambdas=True)",
     t("test_published_recipes_value_by_value"), False),
    ("fusionbench-steps", "adamerging", "Recipe(steps=1000,", "Recipe(steps=500,",
     t("test_published_recipes_value_by_value"), False),
    ("fusionbench-clamp", "adamerging", "lr=1e-3, clamp_lambdas=False)", "lr=1e-3, clamp_lambdas=True)",
     t("test_published_recipes_value_by_value"), False),
    # adamerging: the reference loop and trajectories
    ("optimiser-default-betas", "adamerging", "lr=r.lr, betas=r.betas)", "lr=r.lr)",
     t("test_the_optimiser_uses_the_recipe_betas"), False),
    ("trajectory-raw-lambdas", "adamerging", "with torch.no_grad(): lam = model.effective_lambdas()", "with torch.no_grad(): lam = model.merge_weight.detach()",
     t("test_trajectory_logs_the_effective_lambdas"), False),
    ("reference-no-zero-grad", "adamerging", "        opt.zero_grad(set_to_none=True)\n", "\n",
     t("test_reference_loop_gradient_is_of_the_current_step_only"), False),
    ("reference-task-losses-averaged", "adamerging", "loss = per_task.sum()", "loss = per_task.mean()",
     t("test_task_losses_are_summed_in_both_loops"), False),
    ("reference-log-every-5", "adamerging", "log_every: int = 10,  # trajectory every this many steps", "log_every: int = 5,  # trajectory every this many steps",
     t("test_default_logging_cadence_is_ten_steps"), False),
    # engine
    ("lambda-grad-chunk-offset", "engine", "(tv[s:s + c] * gg[s:s + c, None])", "(tv[s:s + c] * gg[max(0, s - 1):max(0, s - 1) + c, None])",
     t("test_lambda_grad_in_chunks_matches_layer_by_layer"), False),
    ("lambda-grad-chunk-step", "engine", "for s in range(0, len(idx), c)])", "for s in range(0, len(idx), c + 1)])",
     t("test_lambda_grad_in_chunks_matches_layer_by_layer"), False),
    ("engine-task-losses-averaged", "engine", "loss, o, task_loss[t] = loss + lt,", "loss, o, task_loss[t] = loss + lt / K,",
     t("test_task_losses_are_summed_in_both_loops"), False),
    ("engine-entropy-over-all-batches", "engine", "for f in feats[o:o + len(xs[t])].split(batch_size))", "for f in feats[o:o + len(xs[t])].split(len(xs[t])))",
     t("test_engine_entropy_per_batch_and_gradient_through_the_clamp"), False),
    ("engine-grad-skips-clamp", "engine", "        eff.backward(G)", "        model.merge_weight.grad = G.sum(1) if model.merge_weight.ndim == 1 else G",
     t("test_engine_entropy_per_batch_and_gradient_through_the_clamp"), False),
    ("engine-log-every-5", "engine", "log_every: int = 10,  # trajectory, finiteness", "log_every: int = 5,  # trajectory, finiteness",
     t("test_default_logging_cadence_is_ten_steps"), False),
    # data: CLIP's normalisation
    ("clip-mean-imagenet", "data", "OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)", "OPENAI_MEAN = (0.485, 0.456, 0.406)",
     t("test_clip_normalisation_constants_are_open_clip_s"), False),
    ("clip-std-imagenet", "data", "OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)", "OPENAI_STD = (0.229, 0.224, 0.225)",
     t("test_clip_normalisation_constants_are_open_clip_s"), False),
    ("normalise-scale", "data", "return (images.to(dtype) / 255 - m) / s", "return (images.to(dtype) / 256 - m) / s",
     t("test_clip_normalisation_constants_are_open_clip_s"), False),
    # baselines
    ("ta-default-lambda", "baselines", "lambdas: float | Sequence[float] = 0.3,  # λ of every task, or one per task",
     "lambdas: float | Sequence[float] = 0.4,  # λ of every task, or one per task", t("test_baselines_at_the_paper_settings"), False),
    ("ties-merging-padding-dropped", "baselines", "make_task_vectors(base, sds), density, ties_padding)", "make_task_vectors(base, sds), density, 0)",
     t("test_baselines_at_the_paper_settings"), False),
    # methods
    ("adamergingpp-ignores-ties-padding", "methods", "ties_task_vectors(source.task_vectors(), ties_padding=pool.ties_padding)",
     "ties_task_vectors(source.task_vectors())", t("test_adamergingpp_uses_the_pool_ties_padding"), False),
    ("pp-uses-plain-vectors", "methods", '"ties" if method.endswith("pp") else "plain"', '"ties" if method.endswith("ppp") else "plain"',
     t("test_adamergingpp_uses_the_pool_ties_padding"), False),
    ("wrapper-clamp-always", "methods", "clamp_weights=recipe.clamp_lambdas)", "clamp_weights=True)",
     t("test_wrappers_take_the_recipe_clamp_and_init"), False),
    ("wrapper-init-fixed", "methods", "init_values=recipe.init_lambdas,", "init_values=0.3,",
     t("test_wrappers_take_the_recipe_clamp_and_init"), False),
]

def plant(pkg: Path, module: str, old: str, new: str):
    "Apply one replacement to the copied package, refusing a string that does not match exactly once."
    f = pkg / f"{module}.py"
    src = f.read_text()
    if (n := src.count(old)) != 1: raise SystemExit(f"mutant string matches {n} times in adamerging_nb/{module}.py (must be 1): {old!r}")
    f.write_text(src.replace(old, new))

def run_tests(pythonpath: Path, tests: list[str]) -> tuple[bool, str]:
    "Run the targeted tests against the package on `pythonpath`; True when they all pass."
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *[str(ROOT / x) for x in tests]]
    p = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True)  # cwd first on sys.path too
    out = (p.stdout + p.stderr).strip().splitlines()
    why = next((l[1:].strip() for l in out if l.startswith("E ")), "")  # the first error line pytest shows: why it was caught
    return p.returncode == 0, f"{out[-1] if out else ''}{': ' + why if why else ''}"

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="mutant ids to run")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = ap.parse_args()
    ids = [m[0] for m in MUTANTS]
    assert len(set(ids)) == len(ids), "duplicate mutant ids"
    todo = [m for m in MUTANTS if not a.only or m[0] in a.only]
    if a.list:
        for m in todo: print(f"{m[0]:36s} {m[1]:13s} {'(equivalent)' if m[5] else ''}")
        return
    t0, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tmp = Path(tmp)
        for m in MUTANTS: plant(Path(shutil.copytree(ROOT / "adamerging_nb", tmp / "check" / m[0] / "adamerging_nb")), m[1], m[2], m[3])
        where = subprocess.run([sys.executable, "-c", "import adamerging_nb; print(adamerging_nb.__file__)"], cwd=tmp / "check" / MUTANTS[0][0],
                               env={**os.environ, "PYTHONPATH": str(tmp / "check" / MUTANTS[0][0])}, capture_output=True, text=True).stdout.strip()
        assert where.startswith(str(tmp)), f"the mutated copy is not the package imported (got {where})"
        shutil.rmtree(tmp / "check")  # every string matches once before anything runs
        ok, last = run_tests(ROOT, sorted({x for m in todo for x in m[4]}))  # the unmutated package passes the targets
        if not ok: raise SystemExit(f"the targeted tests fail on the unmutated package: {last}")
        for mid, module, old, new, tests, equivalent in todo:
            d = tmp / mid
            pkg = Path(shutil.copytree(ROOT / "adamerging_nb", d / "adamerging_nb"))
            plant(pkg, module, old, new)
            s = time.perf_counter()
            passed, last = run_tests(d, tests)
            rows.append((mid, module, "equivalent" if equivalent else ("SURVIVED" if passed else "caught"), time.perf_counter() - s, last))
            print(f"{mid:36s} {module:13s} {rows[-1][2]:10s} {rows[-1][3]:5.1f}s  {last[:110]}", flush=True)
            shutil.rmtree(d)
    scored = [r for r in rows if r[2] != "equivalent"]
    caught = sum(r[2] == "caught" for r in scored)
    print(f"\n{caught}/{len(scored)} caught ({100 * caught / max(len(scored), 1):.0f} %), "
          f"{len(scored) - caught} survived, {len(rows) - len(scored)} equivalent "
          f"({', '.join(r[0] for r in rows if r[2] == 'equivalent') or 'none'}); {time.perf_counter() - t0:.0f} s")
    if survived := [r[0] for r in scored if r[2] == "SURVIVED"]: print("survived:", ", ".join(survived))
    sys.exit(0 if caught >= 0.9 * len(scored) else 1)

if __name__ == "__main__": main()
