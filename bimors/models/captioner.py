"""The frozen BLIP-2 captioner (transformers), batched beam search with the paper's settings."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
)

from bimors.config import CaptionerConfig, StorageConfig
from bimors.models.frozen import FrozenModule, resolve_dtype
from bimors.models.sources import ModelUnavailableError, load_pretrained, packaged_model_dir

BLIP2_CONFIG_DIR = Path(__file__).parent / "model_configs" / "blip2"
_WORD = re.compile(r"[A-Za-z]")


def build_random_blip2(arch: str, folder: Path, seed: int = 0) -> None:
    """Save a randomly initialised BLIP-2 of a packaged architecture, with its processor, in the
    layout ``from_pretrained`` reads, so tests exercise the same loading path as real weights."""
    spec_path = BLIP2_CONFIG_DIR / f"{arch}.json"
    if not spec_path.is_file():
        known = sorted(p.stem for p in BLIP2_CONFIG_DIR.glob("*.json"))
        raise ModelUnavailableError(f"unknown BLIP-2 architecture {arch!r} for create_if_missing (known: {known})")
    spec = json.loads(spec_path.read_text())
    tokenizer_dir = packaged_model_dir(spec["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    image_processor = BlipImageProcessor(
        size={"height": spec["vision_config"]["image_size"], "width": spec["vision_config"]["image_size"]},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=spec["num_query_tokens"])
    text_config = dict(spec["text_config"])
    text_config.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=spec["vision_config"],
        qformer_config=spec["qformer_config"],
        text_config=text_config,
        num_query_tokens=spec["num_query_tokens"],
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def clean_caption(text: str, fallback: str) -> str:
    """Collapse whitespace and runs of a repeated word; empty or letter-free captions become ``fallback``."""
    words = text.strip().split()
    kept: list[str] = []
    for word in words:
        if kept and word.lower() == kept[-1].lower():
            continue
        kept.append(word)
    caption = " ".join(kept)
    return caption if _WORD.search(caption) else fallback


class Captioner(FrozenModule):
    def __init__(self, model: Blip2ForConditionalGeneration, processor, cfg: CaptionerConfig, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.processor = processor
        self.cfg = cfg
        self.dtype = dtype
        self.freeze()

    @classmethod
    def load(
        cls,
        cfg: CaptionerConfig,
        storage_cfg: StorageConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> "Captioner":
        key = "model.captioner.name"
        common = dict(storage_cfg=storage_cfg, create_if_missing=cfg.create_if_missing, build=build_random_blip2)
        model = load_pretrained(Blip2ForConditionalGeneration, cfg.name, "captioner", key, **common)
        processor = load_pretrained(AutoProcessor, cfg.name, "captioner processor", key, **common)
        dtype = resolve_dtype(cfg.precision, device)
        return cls(model.to(device=device, dtype=dtype), processor, cfg, dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """uint8 RGB images (HWC, any size) -> one cleaned caption each, in one batched generate."""
        if len(images) == 0:
            return []
        size = {"height": self.cfg.image_size, "width": self.cfg.image_size}
        uses_image_tokens = getattr(self.model.config, "image_token_index", None) is not None
        inputs = self.processor(
            images=[np.array(im, dtype=np.uint8) for im in images],  # writable copies (Ray hands out read-only views)
            text=[""] * len(images) if uses_image_tokens else None,
            size=size,
            return_tensors="pt",
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        # Encoder-decoder LMs (flan-t5, the paper's) count only generated tokens in max_length;
        # decoder-only ones (OPT) would count the image-token prompt too.
        if self.model.language_model.config.is_encoder_decoder:
            length = {"max_length": self.cfg.max_length}
        else:
            length = {"max_new_tokens": self.cfg.max_length}
        output = self.model.generate(**inputs, num_beams=self.cfg.num_beams, early_stopping=True, **length)
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [clean_caption(t, self.cfg.fallback_caption) for t in texts]
