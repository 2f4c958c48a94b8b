"""Each method's training step at ViT-B/16 size, side by side, with its learnable parameter count.

Every method trains from pixels here, as the papers do (online features): one step is the frozen
image encoder's forward pass (MaPLe's prompted one, with gradients to its vision prompts), the
learner, the text encoder over every image x class prompt the method needs, the loss (APPLeNet's
with its context penalty) and the backward pass. Learner settings are those of the paper configs
(configs/paper.yaml for BiMoRS, CoOp and CoCoOp, configs/paper-maple.yaml, configs/paper-applenet.yaml).
Caption embeddings (BiMoRS) are random 768-d vectors: captioning is featurization, not a step.

    python benchmarks/method_steps.py                  # ViT-B/16-sized random weights, 38 classes, CPU
    python benchmarks/method_steps.py --device cuda --precision fp16
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from train_step import random_backbone, step_arguments

from bimors.config import load_config
from bimors.data.catalog import get_dataset
from bimors.models.classifier import PromptClassifier, build_learner

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # method -> the config whose learner settings it uses
    "coop": "paper.yaml", "cocoop": "paper.yaml", "bimors": "paper.yaml",
    "maple": "paper-maple.yaml", "applenet": "paper-applenet.yaml",
}


def step(clf: PromptClassifier, pixels: torch.Tensor, captions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    uses = clf.learner.uses
    if "pixels" in uses:
        features = {"pixels": pixels}
    else:
        image = clf.backbone.encode_image(pixels, layer_means="layer_means" in uses)
        features = {"image_emb": image.embedding, "visual_tokens": image.tokens, "caption_emb": captions,
                    "layer_means": image.layer_means}
    _, loss = clf.training_loss(labels, **features)
    loss.backward()
    return loss.detach()


def main() -> None:
    parser = step_arguments(__doc__)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    classnames = get_dataset(args.dataset).classnames
    backbone = random_backbone(args.arch, args.precision, device)
    pixels = torch.randn(args.batch, 3, backbone.image_size, backbone.image_size, device=device)
    captions = torch.randn(args.batch, args.caption_dim, device=device)
    labels = torch.randint(0, len(classnames), (args.batch,), device=device)
    print(f"{args.arch} random weights, {len(classnames)} classes ({args.dataset}), batch {args.batch}, "
          f"{device.type} {args.precision}, {torch.get_num_threads()} threads")

    rows = []
    for method in args.methods:
        learner_cfg = load_config(REPO / "configs" / METHODS[method]).model.learner.model_copy(update={"method": method})
        deepest = min(backbone.text_layers, backbone.vision_layers)
        if learner_cfg.prompt_depth > deepest:  # a small --arch: MaPLe prompts every block it has
            learner_cfg = learner_cfg.model_copy(update={"prompt_depth": deepest})
        learner = build_learner(learner_cfg, backbone, args.caption_dim)
        clf = PromptClassifier(backbone, learner, classnames).train()
        times = []
        for rep in range(args.repeats + 1):  # the first round warms up and is not timed
            clf.learner.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=backbone.dtype, enabled=backbone.dtype != torch.float32):
                loss = step(clf, pixels, captions, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times.append(time.perf_counter() - start)
        assert torch.isfinite(loss), method
        params = sum(p.numel() for p in clf.trainable_parameters())
        rows.append((method, params, statistics.median(times)))
        print(f"  {method:9s} {params:>11,} learnable  {rows[-1][2]:7.3f} s/step (median of {args.repeats})", flush=True)

    base = dict((m, t) for m, _, t in rows).get("bimors")
    print("\n| method | learnable parameters | s/step | vs BiMoRS |\n|---|---|---|---|")
    for method, params, seconds in rows:
        ratio = f"{seconds / base:.2f}x" if base else "-"
        print(f"| {method} | {params:,} | {seconds:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
