"""Model pools built from files in the real formats: Task Arithmetic folders, Hugging Face model folders, the registry."""
import os
os.environ["HF_HUB_OFFLINE"] = "1"  # never download; set before huggingface_hub is imported

import sys
from pathlib import Path

import pytest
import torch
from open_clip.model import CLIP

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoints import TINY, perturbed, write_ta_folder  # noqa: E402

import adamerging_nb.data as data  # noqa: E402
import adamerging_nb.models as models  # noqa: E402
from adamerging_nb.data import class_names, normalize, templates  # noqa: E402
from adamerging_nb.losses import head_logits  # noqa: E402
from adamerging_nb.models import (POOLS, ModelPool, TA_CHECKPOINTS_URL, hf_clip, load_pool, register_pool,  # noqa: E402
                                  zeroshot_head)
from adamerging_nb.testing import same_state  # noqa: E402

TASKS = ["EuroSAT", "MNIST", "DTD"]


def tiny_sets(tasks, n=6, size=32):
    g = torch.Generator().manual_seed(0)
    return {t: data.TestSet(t, torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % len(class_names(t)),
                       class_names(t)) for t in tasks}


def tiny_text_clip(seed=0):
    "An open_clip CLIP with 16-dimensional embeddings, standing in for the OpenAI text tower."
    torch.manual_seed(seed)
    return CLIP(16, dict(image_size=32, patch_size=8, width=64, layers=1, head_width=64, mlp_ratio=2),
                dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1, mlp_ratio=2), quick_gelu=True).eval()


@pytest.fixture
def fake_test_sets(monkeypatch):
    "`load_test_set` (as the pools call it) replaced by tiny sets; records the arguments it was called with."
    calls = []
    def load_test_set(task, **kwargs):
        calls.append((task, kwargs))
        return tiny_sets([task])[task]
    monkeypatch.setattr(models, "load_test_set", load_test_set)
    return calls


def test_registry():
    assert {"vit-b-32-ta8", "vit-b-32-ta8-hf", "tiny"} <= set(POOLS)
    assert load_pool("tiny", n_tasks=2).task_names == ["task0", "task1"]
    with pytest.raises(KeyError, match="known pools: vit-b-32-ta8, vit-b-32-ta8-hf, mini, tiny"):
        load_pool("vit-b-32-ta20")
    register_pool("tiny-2", lambda: load_pool("tiny", n_tasks=2))
    try: assert isinstance(load_pool("tiny-2"), ModelPool)
    finally: del POOLS["tiny-2"]


def test_ta_pool(tmp_path, fake_test_sets):
    pre, fts, heads = write_ta_folder(tmp_path / "ckpt", TASKS, heads_for=["EuroSAT", "MNIST"], n_classes={"EuroSAT": 10, "MNIST": 10})
    text = tiny_text_clip()
    pool = load_pool("vit-b-32-ta8", checkpoint_root=tmp_path / "ckpt", tasks=TASKS, data_source="folder", data_root=tmp_path / "data",
                     cache_dir=tmp_path / "cache", clip=text)
    assert fake_test_sets == [(t, dict(source="folder", root=tmp_path / "data", cache_dir=tmp_path / "cache", check_size=True)) for t in TASKS]
    assert pool.name == "vit-b-32-ta8" and pool.task_names == TASKS
    assert same_state(pool.pretrained, pre.model.visual) and all(same_state(pool.finetuned[t], fts[t].model.visual) for t in TASKS)
    assert torch.equal(pool.heads["EuroSAT"], heads["EuroSAT"]) and torch.equal(pool.heads["MNIST"], heads["MNIST"])
    import open_clip
    want = zeroshot_head(text, open_clip.get_tokenizer("ViT-B-32-quickgelu"), class_names("DTD"), templates("DTD"))
    torch.testing.assert_close(pool.heads["DTD"], want)  # no head file: built from the text tower, then cached
    assert (tmp_path / "cache" / "heads" / "ViT-B-32-openai" / "DTD.safetensors").is_file()
    x = normalize(pool.test_sets["MNIST"].images)
    with torch.no_grad():
        torch.testing.assert_close(pool.finetuned["MNIST"](x), fts["MNIST"](x), atol=1e-5, rtol=1e-5)
        assert head_logits(pool.finetuned["DTD"](x), pool.heads["DTD"]).shape == (6, 47)
    # second build: the cached DTD head is used, no text tower needed
    again = load_pool("vit-b-32-ta8", checkpoint_root=tmp_path / "ckpt", tasks=TASKS, cache_dir=tmp_path / "cache",
                      test_sets=tiny_sets(TASKS), clip=lambda: pytest.fail("the text tower was built although the head is cached"))
    assert torch.equal(again.heads["DTD"], pool.heads["DTD"])
    # head_files=False: every head from the text tower, with the class names of the loaded test sets
    sets = tiny_sets(TASKS)
    sets["EuroSAT"].class_names = sets["EuroSAT"].class_names[::-1]
    own = load_pool("vit-b-32-ta8", checkpoint_root=tmp_path / "ckpt", tasks=TASKS, test_sets=sets, clip=text, head_files=False)
    eurosat = zeroshot_head(text, open_clip.get_tokenizer("ViT-B-32-quickgelu"), class_names("EuroSAT"), templates("EuroSAT"))
    torch.testing.assert_close(own.heads["EuroSAT"], eurosat.flip(0))


def test_ta_pool_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_pool("vit-b-32-ta8", checkpoint_root=tmp_path)
    assert f"{tmp_path}/ViT-B-32/zeroshot.pt" in str(e.value) and TA_CHECKPOINTS_URL in str(e.value) and "(9 of 9 files)" in str(e.value)
    write_ta_folder(tmp_path, ["EuroSAT"], n_classes={"EuroSAT": 3})
    with pytest.raises(ValueError, match="the EuroSAT head has 3 classes, its test set 10"):
        load_pool("vit-b-32-ta8", checkpoint_root=tmp_path, tasks=["EuroSAT"], test_sets=tiny_sets(["EuroSAT"]))
    # a fine-tuned model of another depth: the first differences are named
    write_ta_folder(tmp_path / "other", ["EuroSAT"], vision={**TINY, "layers": 1})
    (tmp_path / "ViT-B-32" / "EuroSAT" / "finetuned.pt").write_bytes((tmp_path / "other" / "ViT-B-32" / "EuroSAT" / "finetuned.pt").read_bytes())
    with pytest.raises(ValueError, match=r"fine-tuned EuroSAT encoder .* missing \['transformer.resblocks.1.ln_1.weight'"):
        load_pool("vit-b-32-ta8", checkpoint_root=tmp_path, tasks=["EuroSAT"], test_sets=tiny_sets(["EuroSAT"]))


def _hf_folders(root, slugs):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
    torch.manual_seed(0)
    hf = perturbed(CLIPModel(CLIPConfig(projection_dim=16,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=32, patch_size=8, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")))).eval()
    hf.save_pretrained(root / "clip-vit-base-patch32")
    fts = {}
    for i, s in enumerate(slugs):
        fts[s] = perturbed(CLIPVisionModel(hf.config.vision_config), seed=i + 1).eval()
        getattr(fts[s], "vision_model", fts[s]).load_state_dict(hf.vision_model.state_dict())  # fine-tuned from the pretrained tower
        perturbed(fts[s], scale=0.01, seed=i + 10)
        fts[s].save_pretrained(root / f"clip-vit-base-patch32_{s}")
    return hf, fts


def test_hf_pool(tmp_path, fake_test_sets):
    hf, fts = _hf_folders(tmp_path, ["eurosat", "mnist", "dtd"])
    pool = load_pool("vit-b-32-ta8-hf", pretrained=tmp_path / "clip-vit-base-patch32", finetuned=str(tmp_path / "clip-vit-base-patch32_{task}"),
                     tasks=TASKS, cache_dir=tmp_path / "cache")
    assert [t for t, _ in fake_test_sets] == TASKS and fake_test_sets[0][1]["source"] == "hf"
    assert pool.name == "vit-b-32-ta8-hf"
    x = normalize(pool.test_sets["DTD"].images)
    with torch.no_grad():
        assert (pool.pretrained(x) - hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)).abs().max() < 1e-5
        for t, s in zip(TASKS, ["eurosat", "mnist", "dtd"]):
            assert (pool.finetuned[t](x) - hf.visual_projection(fts[s](pixel_values=x).pooler_output)).abs().max() < 1e-5
    import open_clip
    text = hf_clip(tmp_path / "clip-vit-base-patch32")
    torch.testing.assert_close(pool.heads["EuroSAT"], zeroshot_head(text, open_clip.get_tokenizer("ViT-B-32-quickgelu"), class_names("EuroSAT"), templates("EuroSAT")))
    assert len(list((tmp_path / "cache" / "heads").glob("hf-*/*.safetensors"))) == 3
    with pytest.raises(FileNotFoundError, match="clip-vit-base-patch32_svhn"):
        load_pool("vit-b-32-ta8-hf", pretrained=tmp_path / "clip-vit-base-patch32", finetuned=str(tmp_path / "clip-vit-base-patch32_{task}"),
                  tasks=["SVHN"], test_sets=tiny_sets(["SVHN"]))


def test_hf_pool_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-base-patch32: no config.json in the Hugging Face cache .* HF_HUB_OFFLINE=1 forbids downloading"):
        load_pool("vit-b-32-ta8-hf", hf_cache_dir=tmp_path)
