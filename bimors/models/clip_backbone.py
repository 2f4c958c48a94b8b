"""The frozen CLIP backbone, over open_clip.

Exposes exactly what the prompt learners need and nothing else: the pooled normalised image
embedding together with the visual tokens (one forward pass), the token embedding, and a text
encoder that accepts prompt *embeddings* and cuts each batch after its last EOT (exact, because
the text transformer is causal).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms.v2 import functional as TF

from bimors.config import BackboneConfig, StorageConfig
from bimors.models.frozen import FrozenModule, resolve_dtype
from bimors.models.sources import ModelUnavailableError, hub_error, is_folder_reference, materialize

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs" / "open_clip"
open_clip.add_model_config(MODEL_CONFIG_DIR)

log = logging.getLogger(__name__)


@dataclass
class ImageFeatures:
    """Per-image outputs of the frozen image tower (fp32 on the backbone's device)."""

    embedding: torch.Tensor  # [B, embed_dim], L2-normalised
    tokens: torch.Tensor  # [B, 1 + n_patches, vision_width], before the final LayerNorm
    layer_means: torch.Tensor | None = None  # [B, vision_layers, vision_width]: each block's output, mean over tokens


def build_random_clip(arch: str, folder: Path, seed: int = 0) -> None:
    """Save a randomly initialised open_clip architecture in open_clip's folder layout
    (``open_clip_config.json`` + ``open_clip_model.safetensors``), the same layout hub checkpoints use,
    so tests and the quickstart load it through the real loading path. Seeded: every worker that
    builds it gets identical weights."""
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ModelUnavailableError(f"unknown open_clip architecture {arch!r} for create_if_missing")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns on the root logger that no weights were loaded: that is the point
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(arch, pretrained=None)
    finally:
        root.setLevel(level)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def _open_clip_source(cfg: BackboneConfig, storage_cfg: StorageConfig | None) -> tuple[str, str | None]:
    """(open_clip model name, pretrained) with folders and remote files made local."""
    if cfg.name.startswith(("hf-hub:", "local-dir:")):
        return cfg.name, None
    if is_folder_reference(cfg.name):
        folder = materialize(cfg.name, storage_cfg, cfg.create_if_missing, build_random_clip, "CLIP backbone")
        if not (folder / "open_clip_config.json").is_file():
            raise ModelUnavailableError(f"CLIP folder {cfg.name} has no open_clip_config.json")
        if not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt")):
            raise ModelUnavailableError(f"CLIP folder {cfg.name} holds no weights (*.safetensors, *.bin, *.pth)")
        return f"local-dir:{folder}", None
    pretrained = cfg.pretrained
    if pretrained and ("://" in pretrained or "/" in pretrained or pretrained.endswith((".safetensors", ".pt", ".pth", ".bin"))):
        from bimors import storage

        local = storage.stage_local(pretrained, storage_cfg)
        if not local.is_file():
            raise ModelUnavailableError(f"CLIP checkpoint {pretrained} does not exist")
        pretrained = str(local)
    return cfg.name, pretrained


#: keys OpenAI's released CLIP checkpoints hold besides the weights (open_clip refuses them as unexpected)
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's own ``ViT-B-16.pt`` files are TorchScript archives: loading one runs its code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _checkpoint_keys(path: Path) -> set[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return set(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return set(state)


def is_openai_checkpoint(path: Path) -> bool:
    """A checkpoint file in OpenAI's format: their TorchScript release, or a state dict with their extra keys."""
    return is_torchscript_archive(path) or OPENAI_EXTRA_KEYS[0] in _checkpoint_keys(path)


def tag_declares_quick_gelu(name: str, pretrained: str | None) -> bool:
    """An open_clip pretrained tag trained with QuickGELU (OpenAI's are)."""
    if not pretrained or name.startswith(("hf-hub:", "local-dir:")) or is_folder_reference(name):
        return False  # hub ids and folders carry the activation in their own config
    return bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))


def needs_forced_quick_gelu(name: str, pretrained: str | None) -> bool:
    """The weights (a tag, or a local checkpoint file in OpenAI's format) were trained with
    QuickGELU but open_clip's config for ``name`` builds GELU: open_clip would build ``ViT-B-16``
    for ``pretrained: openai`` with GELU and only warn, which moves the logits by up to 0.1."""
    if pretrained and Path(pretrained).is_file():
        trained = is_openai_checkpoint(Path(pretrained))
    else:
        trained = tag_declares_quick_gelu(name, pretrained)
    return trained and not (open_clip.get_model_config(name.replace("/", "-")) or {}).get("quick_gelu", False)


def _create_model(name: str, pretrained: str | None, quick_gelu: bool) -> nn.Module:
    """open_clip's factory; OpenAI-format state dicts are loaded here without their extra keys."""
    if pretrained and Path(pretrained).is_file():
        path = Path(pretrained)
        if is_torchscript_archive(path):
            raise ModelUnavailableError(
                f"CLIP checkpoint {pretrained} is a TorchScript archive (OpenAI's release format); bimors never "
                "runs code from a weights file. Use the open_clip tag (model.backbone.pretrained: openai, "
                "safetensors from the hub) or a state dict saved with torch.save(model.state_dict())"
            )
        if is_openai_checkpoint(path):
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
            state = open_clip.factory.load_state_dict(str(path), weights_only=True)
            model.load_state_dict({k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}, strict=True)
            return model
    required = pretrained is not None or name.startswith(("hf-hub:", "local-dir:"))
    return open_clip.create_model(name, pretrained=pretrained, require_pretrained=required, weights_only=True, force_quick_gelu=quick_gelu)


def context_token_count_for(cfg: BackboneConfig, storage_cfg: StorageConfig | None, text: str) -> int:
    """How many tokens ``text`` takes between SOS and EOT in the backbone's tokenizer, read without
    loading the weights (what :func:`bimors.models.prompts.context_token_count` gives once loaded)."""
    name, _ = _open_clip_source(cfg, storage_cfg)
    tokenizer = open_clip.get_tokenizer(name)
    ids = tokenizer([text])[0]
    eot = getattr(tokenizer, "eot_token_id", None)
    return int((ids == eot).int().argmax() if eot is not None else ids.argmax()) - 1


def _fingerprint(model: nn.Module) -> str:
    """A short hash of a few small weight tensors: identifies the weights wherever they were loaded from."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        if key.endswith(("positional_embedding", "text_projection", "proj", "logit_scale", "class_embedding")):
            digest.update(key.encode())
            digest.update(state[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _run_blocks(transformer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, replace) -> torch.Tensor:
    """``x`` [N, L, D] through an open_clip transformer's blocks; ``replace(i, x)`` (on [N, L, D])
    may swap prompt tokens before block i, as MaPLe's deep prompts do."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        x = replace(i, x)
        x = block(x if batch_first else x.transpose(0, 1), attn_mask=mask)
        x = x if batch_first else x.transpose(0, 1)
    return x


class FrozenCLIP(FrozenModule):
    """A frozen open_clip model in eval mode, with a text encoder over prompt embeddings."""

    def __init__(self, model: nn.Module, tokenizer: Any, identity: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.dtype = dtype
        self.text = model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(self.text, attr):
                raise ModelUnavailableError(
                    f"backbone {identity['name']!r} has no CLIP-style text transformer ({attr}); "
                    "prompt learning needs one (HF text towers are not supported)"
                )
        self.pool_type = getattr(self.text, "text_pool_type", getattr(self.text, "pool_type", "argmax"))
        if self.pool_type not in ("argmax", "eos") or getattr(self.text, "cls_emb", None) is not None:
            raise ModelUnavailableError(
                f"backbone {identity['name']!r} pools text with {self.pool_type!r}; an EOT-pooled text tower is needed"
            )
        self.eos_id = getattr(self.text, "text_eos_id", getattr(self.text, "eos_id", None))
        if not hasattr(model.visual, "forward_intermediates") or not hasattr(model.visual, "class_embedding"):
            raise ModelUnavailableError(f"backbone {identity['name']!r} is not a ViT; visual tokens need one")
        pre = open_clip.get_model_preprocess_cfg(model)
        size = pre.get("size", 224)
        self.image_size = size if isinstance(size, int) else int(size[0])
        self.register_buffer("mean", torch.tensor(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1), persistent=False)
        self.interpolation = pre.get("interpolation", "bicubic")
        self.freeze()

    # ---------------------------------------------------------------- construction

    @classmethod
    def load(
        cls,
        cfg: BackboneConfig,
        storage_cfg: StorageConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> "FrozenCLIP":
        name, pretrained = _open_clip_source(cfg, storage_cfg)
        try:
            quick_gelu = needs_forced_quick_gelu(name, pretrained)
            model = _create_model(name, pretrained, quick_gelu)
        except ModelUnavailableError:
            raise
        except (RuntimeError, OSError) as err:
            if name.startswith("local-dir:") or (pretrained and Path(pretrained).exists()):
                raise ModelUnavailableError(f"could not load CLIP weights from {cfg.name}: {err}") from err
            raise hub_error("CLIP backbone", f"{cfg.name}:{cfg.pretrained}" if cfg.pretrained else cfg.name, "model.backbone.name", err) from err
        tokenizer = open_clip.get_tokenizer(name)
        identity = {
            "name": cfg.name,
            "pretrained": cfg.pretrained if not name.startswith(("hf-hub:", "local-dir:")) else None,
            "embed_dim": int(model.visual.output_dim),
            "text_width": int((model.text if hasattr(model, "text") else model).ln_final.weight.shape[0]),
            "vision_width": int(model.visual.class_embedding.shape[-1]) if hasattr(model.visual, "class_embedding") else None,
            "fingerprint": _fingerprint(model),
        }
        if quick_gelu:  # recorded only where the build changed, so other identities stay as they were
            identity["quick_gelu"] = True
        dtype = resolve_dtype(cfg.precision, device)
        model = model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, identity, dtype)

    # ---------------------------------------------------------------- shapes

    @property
    def device(self) -> torch.device:
        return self.text.positional_embedding.device

    @property
    def embed_dim(self) -> int:
        return self.identity["embed_dim"]

    @property
    def ctx_dim(self) -> int:
        return self.identity["text_width"]

    @property
    def vision_width(self) -> int:
        return self.identity["vision_width"]

    @property
    def vision_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def text_layers(self) -> int:
        return len(self.text.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()

    # ---------------------------------------------------------------- images

    def preprocess(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """uint8 RGB images (HWC arrays, any size) -> normalised [B, 3, S, S] on the backbone device:
        shortest side resized to S, centre crop, CLIP mean/std (as open_clip's eval transform)."""
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3:
            batch = images
        else:
            tensors = [torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1) for im in images]
            mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
            out = []
            for t in tensors:
                t = TF.resize(t, self.image_size, interpolation=mode, antialias=True)
                out.append(TF.center_crop(t, [self.image_size, self.image_size]))
            batch = torch.stack(out)
        batch = batch.to(self.device)
        if batch.dtype == torch.uint8:
            batch = batch.float().div_(255.0)
        return ((batch.float() - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, layer_means: bool = False) -> ImageFeatures:
        """One pass of the image tower -> pooled embedding and every token before ``ln_post``, and
        with ``layer_means`` the mean token of every block's output (APPLeNet's multi-scale input)."""
        out = self.model.visual.forward_intermediates(
            pixels.to(device=self.device, dtype=self.dtype),
            indices=None if layer_means else 1,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        prefix, patches = out["image_intermediates_prefix"], out["image_intermediates"]
        tokens = torch.cat([prefix[-1], patches[-1]], dim=1)
        embedding = F.normalize(out["image_features"].float(), dim=-1)
        means = None
        if layer_means:
            means = torch.stack([torch.cat([p, x], dim=1).float().mean(dim=1) for p, x in zip(prefix, patches)], dim=1)
        return ImageFeatures(embedding=embedding, tokens=tokens.float(), layer_means=means)

    def encode_image_prompted(self, pixels: torch.Tensor, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """MaPLe's image tower: ``prompts[0]`` [n, width] is appended to the visual tokens after the
        positional embedding (before ``ln_pre``), ``prompts[i]`` replaces those n tokens before block
        i. Returns the normalised embedding [B, embed_dim] in fp32; gradients flow to the prompts."""
        visual = self.model.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ModelUnavailableError("vision prompts need a ViT pooled by its class token")
        x = visual.conv1(pixels.to(device=self.device, dtype=self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        n = prompts[0].shape[0]
        x = torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)

        def replace(i: int, x: torch.Tensor) -> torch.Tensor:
            if 1 <= i < len(prompts):
                x = torch.cat([x[:, :-n], prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            return x

        x = _run_blocks(visual.transformer, x, None, replace)
        pooled = visual.ln_post(x)[:, 0] if not getattr(visual, "final_ln_after_pool", False) else visual.ln_post(x[:, 0])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled.float(), dim=-1)

    # ---------------------------------------------------------------- text

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the token whose feature is the sentence feature (CLIP: the EOT, the largest id)."""
        if self.pool_type == "eos" and self.eos_id is not None:
            return (ids == self.eos_id).int().argmax(dim=-1)
        return ids.argmax(dim=-1)

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.token_embedding(ids.to(self.device)).float()

    def encode_prompts(self, prompts: torch.Tensor, eot: torch.Tensor, deep: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Prompt embeddings [N, L, D] (L may be shorter than the context length) -> normalised text
        features [N, embed_dim] in fp32. Gradients flow to ``prompts``. ``deep`` (MaPLe): ``deep[i-1]``
        [n, D] replaces the n context tokens after SOS before block i."""
        length = prompts.shape[1]
        x = prompts.to(self.dtype) + self.text.positional_embedding[:length].to(self.dtype)
        mask = getattr(self.text, "attn_mask", None)
        if mask is not None:
            mask = mask[:length, :length].to(device=x.device, dtype=x.dtype if mask.is_floating_point() else mask.dtype)
        if deep:
            n = deep[0].shape[0]

            def replace(i: int, x: torch.Tensor) -> torch.Tensor:
                if 1 <= i <= len(deep):
                    x = torch.cat([x[:, :1], deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
                return x

            x = _run_blocks(self.text.transformer, x, mask, replace)
        else:
            x = self.text.transformer(x, attn_mask=mask)
        x = x[torch.arange(x.shape[0], device=x.device), eot.to(x.device)]
        x = self.text.ln_final(x)
        proj = self.text.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    @property
    def is_causal(self) -> bool:
        """Only a causal text transformer lets the prompt be cut after its last EOT."""
        return getattr(self.text, "attn_mask", None) is not None
