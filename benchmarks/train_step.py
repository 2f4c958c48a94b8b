"""Time one BiMoRS training step (forward + backward) two ways on the same weights and batch.

* batched: this project's path: all image x class prompts in one text-encoder call, each prompt
  cut after its last EOT;
* reference: a per-image loop over full-length (77-token) prompts, as ipankhi/BiMoRS does.

Both include the frozen image encoder's forward pass (the paper trains with online features).
The script checks that both give the same loss and gradients before it reports the speed-up.

    python benchmarks/train_step.py                  # ViT-B/16-sized random weights, 38 classes, CPU
    python benchmarks/train_step.py --device cuda --precision fp16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bimors.config import BackboneConfig, LearnerConfig
from bimors.data.catalog import get_dataset
from bimors.models.classifier import PromptClassifier, build_learner
from bimors.models.clip_backbone import FrozenCLIP, build_random_clip


def reference_step(clf_full: PromptClassifier, pixels: torch.Tensor, captions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference implementation's shape of computation: one text-encoder call per image, 77 tokens."""
    backbone = clf_full.backbone
    feats = backbone.encode_image(pixels)
    ctx = clf_full.learner(feats.embedding, feats.tokens, captions)
    logits = []
    for i in range(ctx.shape[0]):
        prompts, eot = clf_full.prompts.build(ctx[i])
        text = backbone.encode_prompts(prompts, eot)
        logits.append(backbone.logit_scale * feats.embedding[i] @ text.t())
    loss = F.cross_entropy(torch.stack(logits), labels)
    loss.backward()
    return loss.detach()


def batched_step(clf: PromptClassifier, pixels: torch.Tensor, captions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    feats = clf.backbone.encode_image(pixels)
    loss = F.cross_entropy(clf(feats.embedding, feats.tokens, captions), labels)
    loss.backward()
    return loss.detach()


def timed(step, clf, *batch, device: torch.device) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    clf.learner.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=clf.backbone.dtype, enabled=clf.backbone.dtype != torch.float32):
        loss = step(clf, *batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    grads = [p.grad.detach().clone() for p in clf.trainable_parameters()]
    return time.perf_counter() - start, loss, grads


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the training-step benchmarks (this one and method_steps.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip architecture built with random weights")
    parser.add_argument("--dataset", default="patternnet", help="catalog dataset whose class names are used")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--caption-dim", type=int, default=768, help="768 = bert-base-uncased")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    return parser


def random_backbone(arch: str, precision: str, device: torch.device) -> FrozenCLIP:
    """``arch`` with seeded random weights, loaded through the real loading path."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / arch
        build_random_clip(arch, folder)
        return FrozenCLIP.load(BackboneConfig(name=str(folder), pretrained=None, precision=precision), device=device)


def main() -> None:
    args = step_arguments(__doc__).parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    classnames = get_dataset(args.dataset).classnames
    backbone = random_backbone(args.arch, args.precision, device)
    learner = build_learner(LearnerConfig(method="bimors"), backbone, args.caption_dim)
    clf = PromptClassifier(backbone, learner, classnames, truncate=True).train()
    clf_full = PromptClassifier(backbone, learner, classnames, truncate=False).train()

    pixels = torch.randn(args.batch, 3, backbone.image_size, backbone.image_size, device=device)
    captions = torch.randn(args.batch, args.caption_dim, device=device)
    labels = torch.randint(0, len(classnames), (args.batch,), device=device)

    print(f"{args.arch} random weights, {len(classnames)} classes ({args.dataset}), batch {args.batch}, "
          f"{device.type} {args.precision}, {torch.get_num_threads()} threads; prompt length "
          f"{clf.prompts.length} (batched) vs {clf_full.prompts.length} (reference)")
    times: dict[str, list[float]] = {"reference": [], "batched": []}
    results = {}
    for rep in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, step, model in (("reference", reference_step, clf_full), ("batched", batched_step, clf)):
            seconds, loss, grads = timed(step, model, pixels, captions, labels, device=device)
            results[name] = (loss, grads)
            if rep:
                times[name].append(seconds)
    (ref_loss, ref_grads), (our_loss, our_grads) = results["reference"], results["batched"]
    tol = 1e-4 if args.precision == "fp32" else 5e-2
    torch.testing.assert_close(our_loss, ref_loss, atol=tol, rtol=tol)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=max(tol, 1e-3))
    ref, ours = statistics.median(times["reference"]), statistics.median(times["batched"])
    print(f"same loss ({our_loss.item():.6f}) and gradients on both paths")
    print(f"reference per-image loop, 77 tokens : {ref:8.3f} s/step (median of {args.repeats})")
    print(f"batched, cut after last EOT         : {ours:8.3f} s/step (median of {args.repeats})")
    print(f"speed-up: {ref / ours:.1f}x")


if __name__ == "__main__":
    main()
