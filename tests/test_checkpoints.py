"""Checkpoint round trips through the real file formats: Task Arithmetic pickles and Hugging Face CLIP folders.

The Task Arithmetic files are written the way the paper's checkpoints were: `torch.save` of whole modules
whose classes live in `src.modeling` and in open_clip 2.0.2. Stand-ins for those classes are put into
`sys.modules` under the original names while saving and taken out again before reading, so the reader
must cope without them, as it does with the real files.
"""
import os
os.environ["HF_HUB_OFFLINE"] = "1"  # never download; set before huggingface_hub is imported

import copy, sys, time, types
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, RandomResizedCrop, Resize, ToTensor

from adamerging_nb.archives import ArchiveError, read_torch_archive
from adamerging_nb.models import (create_clip, hf_image_encoder, hf_clip, read_hf_checkpoint, read_ta_encoder,
                                  read_ta_head, read_ta_state_dict, visual_state, hf_to_open_clip)
from adamerging_nb.losses import head_logits
from adamerging_nb.reference import official_layer_index

B32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0)
TINY = dict(image_size=32, patch_size=8, width=64, layers=2, heads=1, mlp_ratio=2.0)


# --- stand-ins for the classes the Task Arithmetic pickles name ---------------------------------------------------

def _classes(transformer_module: str):
    "Classes shaped like open_clip 2.0.2's and Task Arithmetic's `src.modeling`, with their forward passes."
    class LayerNorm(nn.LayerNorm):
        def forward(self, x): return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)

    class QuickGELU(nn.Module):
        def forward(self, x): return x * torch.sigmoid(1.702 * x)

    class ResidualAttentionBlock(nn.Module):
        def __init__(self, d_model, n_head, mlp_ratio=4.0, act_layer=QuickGELU):
            super().__init__()
            self.ln_1 = LayerNorm(d_model)
            self.attn = nn.MultiheadAttention(d_model, n_head)
            self.ln_2 = LayerNorm(d_model)
            w = int(d_model * mlp_ratio)
            self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, w)), ("gelu", act_layer()), ("c_proj", nn.Linear(w, d_model))]))

        def forward(self, x):
            y = self.ln_1(x)
            x = x + self.attn(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class Transformer(nn.Module):
        def __init__(self, width, layers, heads, mlp_ratio=4.0, act_layer=QuickGELU):
            super().__init__()
            self.width, self.layers, self.grad_checkpointing = width, layers, False
            self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)])

        def forward(self, x):
            for r in self.resblocks: x = r(x)
            return x

    class VisualTransformer(nn.Module):
        def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, output_dim, act_layer=QuickGELU):
            super().__init__()
            self.image_size, self.patch_size = (image_size, image_size), (patch_size, patch_size)
            self.grid_size = (image_size // patch_size, image_size // patch_size)
            self.output_dim = output_dim
            self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
            scale = width ** -0.5
            self.class_embedding = nn.Parameter(scale * torch.randn(width))
            self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
            self.ln_pre = LayerNorm(width)
            self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer=act_layer)
            self.ln_post = LayerNorm(width)
            self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

        def forward(self, x):
            x = self.conv1(x).flatten(2).permute(0, 2, 1)
            cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
            x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
            x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
            return self.ln_post(x[:, 0, :]) @ self.proj

    class CLIP(nn.Module):
        def __init__(self, embed_dim, vision, text_width=32, text_layers=1, text_heads=2, vocab_size=49408, context_length=77):
            super().__init__()
            self.context_length = context_length
            self.visual = VisualTransformer(**vision, output_dim=embed_dim)
            self.transformer = Transformer(text_width, text_layers, text_heads)
            self.vocab_size = vocab_size
            self.token_embedding = nn.Embedding(vocab_size, text_width)
            self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, text_width))
            self.ln_final = LayerNorm(text_width)
            self.text_projection = nn.Parameter(text_width ** -0.5 * torch.randn(text_width, embed_dim))
            self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
            self.register_buffer("attn_mask", torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1), persistent=False)

    def _convert_to_rgb(image): return image.convert("RGB")

    class ImageEncoder(nn.Module):
        def __init__(self, model, keep_lang=False):
            super().__init__()
            self.model = model
            size, norm = model.visual.image_size[0], Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
            self.train_preprocess = Compose([RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC), _convert_to_rgb, ToTensor(), norm])
            self.val_preprocess = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), _convert_to_rgb, ToTensor(), norm])
            self.cache_dir = None
            if not keep_lang and hasattr(self.model, "transformer"): delattr(self.model, "transformer")

        def forward(self, images): return self.model.visual(images)

    class ClassificationHead(nn.Linear):
        def __init__(self, normalize, weights, biases=None):
            output_size, input_size = weights.shape
            super().__init__(input_size, output_size)
            self.normalize = normalize
            self.weight = nn.Parameter(weights.clone())
            self.bias = nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

        def forward(self, inputs):
            if self.normalize: inputs = inputs / inputs.norm(dim=-1, keepdim=True)
            return super().forward(inputs)

    homes = {"src.modeling": [ImageEncoder, ClassificationHead], "open_clip.model": [CLIP, VisualTransformer], "open_clip.transform": [_convert_to_rgb]}
    homes.setdefault(transformer_module, []).extend([Transformer, ResidualAttentionBlock, LayerNorm, QuickGELU])
    return homes, types.SimpleNamespace(**{c.__name__: c for cs in homes.values() for c in cs})


@contextmanager
def original_names(transformer_module: str = "open_clip.model"):
    "Stand-in classes registered in `sys.modules` under the names the Task Arithmetic pickles use; all gone afterwards."
    homes, ns = _classes(transformer_module)
    mods = {"src": types.ModuleType("src")}
    for name, classes in homes.items():
        mods.setdefault(name, types.ModuleType(name))
        for c in classes:
            c.__module__, c.__qualname__ = name, c.__name__
            setattr(mods[name], c.__name__, c)
    mods["src"].modeling = mods["src.modeling"]
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try: yield ns
    finally:
        for k, v in saved.items():
            if v is None: del sys.modules[k]
            else: sys.modules[k] = v


def perturbed(m: nn.Module, scale=0.02, seed=0) -> nn.Module:
    "Make every tensor matter (open_clip-style inits leave LayerNorms at 1/0)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def write_ta_folder(root, tasks, vision=TINY, embed_dim=16, heads_for=None, transformer_module="open_clip.model", seed=0, perturb=True,
                    n_classes=None):
    "A Task Arithmetic checkpoint folder `<root>/ViT-B-32/...`; returns the stand-in encoders and heads that were saved."
    folder = root / "ViT-B-32"
    torch.manual_seed(seed)
    with original_names(transformer_module) as oc:
        clip = oc.CLIP(embed_dim, vision)
        pre = oc.ImageEncoder(perturbed(clip, seed=seed) if perturb else clip).eval()
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(pre, folder / "zeroshot.pt")
        fts, heads = {}, {}
        for i, t in enumerate(tasks):
            (folder / t).mkdir(exist_ok=True)
            fts[t] = copy.deepcopy(pre)
            perturbed(fts[t].model.visual, scale=0.01, seed=seed + i + 1)
            torch.save(fts[t], folder / t / "finetuned.pt")
        for i, t in enumerate(heads_for if heads_for is not None else tasks):
            h = F.normalize(torch.randn((n_classes or {}).get(t, 3 + i), embed_dim), dim=-1) * 100
            heads[t] = h
            torch.save(oc.ClassificationHead(True, h), folder / f"head_{t}.pt")
    return pre, fts, heads


# --- Task Arithmetic pickles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("transformer_module", ["open_clip.model", "open_clip.transformer"])
def test_ta_roundtrip_tiny(tmp_path, transformer_module):
    pre, fts, heads = write_ta_folder(tmp_path, ["MNIST", "DTD"], transformer_module=transformer_module)
    assert "src.modeling" not in sys.modules and not hasattr(sys.modules["open_clip.model"], "VisualTransformer")
    folder = tmp_path / "ViT-B-32"
    full = read_ta_state_dict(folder / "zeroshot.pt")
    ref = {k[len("model."):]: v for k, v in pre.state_dict().items()}
    assert list(full) == list(ref) and all(torch.equal(full[k], ref[k]) for k in ref)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for path, orig in [(folder / "zeroshot.pt", pre), *((folder / t / "finetuned.pt", m) for t, m in fts.items())]:
            enc = read_ta_encoder(path)
            assert type(enc).__module__ == "open_clip.transformer" and type(enc).__name__ == "VisionTransformer"
            sd = orig.model.visual.state_dict()
            assert set(enc.state_dict()) == set(sd) and all(torch.equal(enc.state_dict()[k], v) for k, v in sd.items())
            torch.testing.assert_close(enc(x), orig(x), atol=1e-5, rtol=1e-5)
        for t, h in heads.items():
            got = read_ta_head(folder / f"head_{t}.pt")
            assert torch.equal(got, h)
            f = torch.randn(4, 16)
            torch.testing.assert_close(head_logits(f, got), F.normalize(f, dim=-1) @ h.T)


def test_ta_roundtrip_vit_b_32(tmp_path):
    "At ViT-B/32 size: the keys of current open_clip's ViT-B-32, and the order of the released layer-wise coefficients."
    t0 = time.time()
    pre, _, heads = write_ta_folder(tmp_path, [], vision=B32, embed_dim=512, heads_for=["SUN397"], transformer_module="open_clip.transformer", perturb=False)
    path = tmp_path / "ViT-B-32" / "zeroshot.pt"
    full = read_ta_state_dict(path)
    assert list(full) == official_layer_index().state_dict_key.tolist()  # 158 tensors, text side included
    oc = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    ref, vis = oc.visual.state_dict(), visual_state(full)
    assert set(vis) == set(ref) and all(vis[k].shape == ref[k].shape for k in ref)
    enc = read_ta_encoder(path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(): torch.testing.assert_close(enc(x), pre(x), atol=1e-4, rtol=1e-4)
    oc.visual.load_state_dict(vis)
    with torch.no_grad(): assert torch.equal(oc.encode_image(x), enc(x))
    assert read_ta_head(tmp_path / "ViT-B-32" / "head_SUN397.pt").shape == (3, 512)
    print(f"ViT-B/32 round trip: {time.time() - t0:.1f} s")


class _Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def test_disallowed_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), tmp_path / "evil.pt")
    with pytest.raises(ArchiveError, match=rf"it asks for the global {os.system.__module__}\.system"):
        read_torch_archive(tmp_path / "evil.pt")
    with original_names() as oc:  # hidden inside an otherwise ordinary Task Arithmetic encoder
        enc = oc.ImageEncoder(oc.CLIP(16, TINY))
        enc.cache_dir = _Evil(marker)
        torch.save(enc, tmp_path / "zeroshot.pt")
    with pytest.raises(ArchiveError, match="system"):
        read_ta_encoder(tmp_path / "zeroshot.pt")
    for name, obj in [("eval", eval), ("Popen", __import__("subprocess").Popen)]:
        torch.save({"x": obj}, tmp_path / f"{name}.pt")
        with pytest.raises(ArchiveError, match=f"it asks for the global .*{name}"):
            read_torch_archive(tmp_path / f"{name}.pt")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # torch's legacy writer wants the stand-ins' source
def test_legacy_torch_format_is_refused_with_a_way_out(tmp_path):
    "Torch's pre-1.6 format is read by code paths that act on the file: refused before anything is read."
    with original_names() as oc:
        enc = perturbed(oc.ImageEncoder(oc.CLIP(16, TINY)))
        torch.save(enc, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ArchiveError, match=r"old.pt: it is a plain pickle or torch's legacy pre-1.6 format.*Re-save it as a zip archive"):
        read_ta_encoder(tmp_path / "old.pt")


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        read_ta_encoder(tmp_path / "zeroshot.pt")
    torch.save({"model.token_embedding.weight": torch.ones(3, 2)}, tmp_path / "text.pt")
    with pytest.raises(ValueError, match="holds no image encoder"):
        read_ta_encoder(tmp_path / "text.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ArchiveError, match="list.pt: it holds a list, not a torch module or a state dict"):
        read_ta_state_dict(tmp_path / "list.pt")


# --- Hugging Face CLIP ---------------------------------------------------------------------------------------------

def _b32_vision_config():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
                            image_size=224, projection_dim=512, hidden_act="quick_gelu")


def test_hf_vit_b_32_matches(tmp_path):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    hf = CLIPVisionModelWithProjection(_b32_vision_config()).eval()
    hf.save_pretrained(tmp_path / "pre")
    enc = hf_image_encoder(tmp_path / "pre")
    ref = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).visual.state_dict()
    assert set(enc.state_dict()) == set(ref) and all(enc.state_dict()[k].shape == ref[k].shape for k in ref)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = hf(pixel_values=x).image_embeds
        assert (enc(x) - want).abs().max() < 1e-4
    # a fine-tuned CLIPVisionModel has no projection: it comes from the pretrained model
    ft = CLIPVisionModel(_b32_vision_config()).eval()
    ft.save_pretrained(tmp_path / "ft")
    enc_ft = hf_image_encoder(tmp_path / "ft", projection=enc.proj)
    with torch.no_grad():
        want = hf.visual_projection(ft(pixel_values=x).pooler_output)
        assert (enc_ft(x) - want).abs().max() < 1e-4
    assert torch.equal(enc_ft.proj, enc.proj)


def test_hf_transformers4_layout_and_bin(tmp_path):
    "Files written by transformers 4 name CLIPVisionModel tensors 'vision_model.*'; pytorch_model.bin is read weights-only."
    import json
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32,
                           projection_dim=16, hidden_act="quick_gelu")
    hf = perturbed(CLIPVisionModelWithProjection(cfg)).eval()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg.to_dict()))
    sd = {("vision_model." + k if not k.startswith(("vision_model.", "visual_projection")) else k): v for k, v in hf.state_dict().items()}
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin")
    enc = hf_image_encoder(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert (enc(x) - hf(pixel_values=x).image_embeds).abs().max() < 1e-5
    assert len(enc.transformer.resblocks) == 2 and enc.transformer.resblocks[0].attn.num_heads == 2


def test_hf_clip_text_tower_matches(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    hf = perturbed(CLIPModel(CLIPConfig(projection_dim=16,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")))).eval()
    hf.save_pretrained(tmp_path / "clip")
    oc = hf_clip(tmp_path / "clip")
    ids = open_clip.get_tokenizer("ViT-B-32-quickgelu")(["a photo of a dog.", 'a photo of the number: "7".'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (oc.encode_text(ids) - hf.text_projection(hf.text_model(input_ids=ids).pooler_output)).abs().max() < 1e-5
        assert (oc.encode_image(x) - hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)).abs().max() < 1e-5


def test_hf_errors(tmp_path):
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        read_hf_checkpoint("tanganke/clip-vit-base-patch32_sun397", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 is set and they are not in the cache"):
        create_clip("ViT-B-32", "openai", cache_dir=tmp_path)
    assert time.time() - t0 < 30  # no retrying
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin in the folder"):
        read_hf_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="unexpected tensors"):
        hf_to_open_clip({"bert.pooler.weight": torch.ones(2)})
