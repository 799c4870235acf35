"""An independent PyTorch implementation of reid-tf's global baseline recipe (no reid-tf code).

The same data (a Market-layout folder), image size, P x K batches, augmentation (flip, zero-pad 10
and random crop; no erasing), optimiser (Adam, decoupled weight decay 5e-4 on weights only, eps
1e-7, heads at --learning_rate and the backbone at x --backbone_lr_multiplier, linear warm-up then
cosine to 0), embedding head (GAP -> Linear 1280->256 -> BatchNorm1d -> bias-free classifier,
normal std 0.001) and evaluation protocol (cosine on the L2-normalised post-BN embedding; Market:
gallery images of the query's own identity and camera left out; non-interpolated AP) as
experiments/cuhk03_pair1_<data>_mobilenetv2_128x64.flags with --num_parts=0. Details that decide
the result are listed in WORKSPACE.md ("PyTorch peer"). `--triplet_weight=1` adds the batch-hard
triplet loss (Hermans et al. 2017; hardest positive, itself included, and hardest negative in the
P x K batch, Euclidean on the embedding before the BatchNorm, hinge `--triplet_margin`, 0 = soft
margin), the peer of reid-tf's `--triplet_weight`.

    python3.11 -m venv experiments/peers/.venv
    experiments/peers/.venv/bin/pip install -r experiments/peers/requirements.txt
    experiments/peers/.venv/bin/python experiments/peers/torch_baseline.py \
        --data=../shared/data/cuhk03_pair1_labeled --weights=../shared/weights/mobilenet_v2-b0353104.pth \
        --steps=1920 --seed=0 --output=experiments/results/peer_labeled_baseline_s0.json

Prints a progress line every 50 steps and writes the results JSON (results and flags) at the end.
With `--checkpoint=PATH` it saves its whole state (weights, optimiser, both random generators, the
rest of the epoch's batches) there every `--checkpoint_every` steps and resumes from it when
started again, so an interrupted run loses at most that many steps.
`--benchmark_steps=N` times N training steps after 5 warm-up steps and exits (images/s).
"""

import argparse
import glob
import json
import math
import os
import re
import time

import numpy as np
from PIL import Image
import torch
from torch import nn
import torch.nn.functional as F
import torchvision

NAME = re.compile(r"^(-?\d+)_c(\d+)")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def read_folder(folder):
    """uint8 images [N,3,H,W], person ids, cameras of a Market-layout folder (junk -1 dropped)."""
    images, pids, cams = [], [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.jpg"))):
        match = NAME.match(os.path.basename(path))
        if match is None or int(match.group(1)) < 0:
            continue
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
        pids.append(int(match.group(1)))
        cams.append(int(match.group(2)))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            np.array(pids), np.array(cams))


def pk_batches(labels, p, k, rng):
    """One epoch of P x K batches, torchreid's RandomIdentitySampler in spirit: each identity's
    images shuffled and cut into chunks of K (short identities re-drawn to K), then batches of P
    distinct identities drawn at random from those with chunks left."""
    chunks = {}
    for identity in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == identity))
        if len(index) < k:
            index = np.concatenate([index, rng.choice(index, k - len(index))])
        chunks[identity] = [index[i:i + k] for i in range(0, len(index) - k + 1, k)]
    batches = []
    while sum(1 for c in chunks.values() if c) >= p:
        available = [i for i, c in chunks.items() if c]
        chosen = rng.choice(available, p, replace=False)
        batches.append(np.concatenate([chunks[i].pop() for i in chosen]))
    return batches


def augment(images, generator, pad=10):
    """uint8 [B,3,H,W] -> float [B,3,H,W] in [0,1]: random flip, zero-pad and random crop."""
    batch, _, height, width = images.shape
    images = images.float() / 255.0
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (pad, pad, pad, pad))
    tops = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    lefts = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    return torch.stack([padded[i, :, t:t + height, l:l + width]
                        for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))])


class Baseline(nn.Module):
    def __init__(self, num_classes, weights, last_stride=1, embedding_dim=256):
        super().__init__()
        net = torchvision.models.mobilenet_v2()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        if last_stride == 1:  # block 14 (the stride-2 block of the last stage) keeps the size
            net.features[14].conv[1][0].stride = (1, 1)
        self.backbone = net.features
        self.embedding = nn.Linear(1280, embedding_dim)
        # Keras's defaults for the reid-tf head: LeCun truncated normal kernel, zero bias;
        # BatchNormalization momentum 0.99 (PyTorch 0.01), epsilon 1e-3.
        nn.init.trunc_normal_(self.embedding.weight, std=1.0 / math.sqrt(1280) / 0.87962566103423978,
                              a=-2.0 / math.sqrt(1280) / 0.87962566103423978,
                              b=2.0 / math.sqrt(1280) / 0.87962566103423978)
        nn.init.zeros_(self.embedding.bias)
        self.bn = nn.BatchNorm1d(embedding_dim, momentum=0.01, eps=1e-3)
        self.classifier = nn.Linear(embedding_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images):
        features = self.embedding(self.backbone((images - MEAN) / STD).mean(dim=(2, 3)))
        embedding = self.bn(features)
        return embedding, self.classifier(embedding), features


def batch_hard_triplet(features, labels, margin):
    """Mean over anchors of max(0, d(a, hardest p) - d(a, hardest n) + margin), or the soft
    margin softplus(d_ap - d_an) when margin is 0."""
    squares = (features * features).sum(dim=1)
    distances = (squares[:, None] + squares[None, :] - 2 * features @ features.t()).clamp(
        min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    hardest_positive = torch.where(same, distances, torch.zeros_like(distances)).amax(dim=1)
    hardest_negative = torch.where(same, torch.full_like(distances, float("inf")),
                                   distances).amin(dim=1)
    gap = hardest_positive - hardest_negative
    return (F.softplus(gap) if margin == 0 else F.relu(gap + margin)).mean()


def save_checkpoint(path, state):
    """Writes `state` to `path` whole or not at all (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def schedule(step, total, warmup):
    warm = min(1.0, (step + 1) / max(warmup, 1))
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return warm * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, learning_rate, backbone_multiplier, weight_decay):
    groups = []
    for params, lr in ((list(model.backbone.parameters()), learning_rate * backbone_multiplier),
                       (list(model.embedding.parameters()) + list(model.bn.parameters())
                        + list(model.classifier.parameters()), learning_rate)):
        decay = [p for p in params if p.dim() > 1]  # conv and linear weights only
        rest = [p for p in params if p.dim() <= 1]  # biases, BatchNorm scales and offsets
        groups += [{"params": decay, "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
                   {"params": rest, "lr": lr, "base_lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, eps=1e-7)


@torch.no_grad()
def embed(model, images, batch_size=128):
    model.eval()
    out = [F.normalize(model(images[i:i + batch_size].float() / 255.0)[0], dim=1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def market_eval(query, gallery, q_pids, g_pids, q_cams, g_cams, max_rank=20):
    """rank-k CMC, mAP, mINP (torchreid's eval_market1501, written out again)."""
    distances = 1.0 - query @ gallery.T
    cmc_sum, aps, inps, valid = np.zeros(max_rank), [], [], 0
    for i in range(len(query)):
        order = np.argsort(distances[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        matches = (g_pids[order] == q_pids[i])[keep]
        if not matches.any():
            continue
        valid += 1
        cmc = matches.cumsum()
        cmc_sum += (cmc[:max_rank] >= 1)
        positions = np.flatnonzero(matches)
        aps.append(np.mean((np.arange(len(positions)) + 1) / (positions + 1)))
        inps.append(len(positions) / (positions[-1] + 1))
    cmc = cmc_sum / valid
    return {"rank1": float(cmc[0]), "rank5": float(cmc[4]), "mAP": float(np.mean(aps)),
            "mINP": float(np.mean(inps)), "cmc": cmc.tolist(), "num_queries": valid,
            "skipped_queries": len(query) - valid}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--steps", type=int, default=1920)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identities_per_batch", type=int, default=16)
    parser.add_argument("--images_per_identity", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--backbone_lr_multiplier", type=float, default=0.35)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--triplet_weight", type=float, default=0.0)
    parser.add_argument("--triplet_margin", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--benchmark_steps", type=int, default=0)
    parser.add_argument("--output")
    parser.add_argument("--checkpoint", help="save here every --checkpoint_every steps; resume")
    parser.add_argument("--checkpoint_every", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_images, train_pids, _ = read_folder(os.path.join(args.data, "bounding_box_train"))
    _, labels = np.unique(train_pids, return_inverse=True)
    model = Baseline(int(labels.max()) + 1, args.weights)
    optimizer = make_optimizer(model, args.learning_rate, args.backbone_lr_multiplier,
                               args.weight_decay)
    labels_t = torch.from_numpy(labels)
    batches, epoch, step, seen, start = [], 0, 0, 0, time.perf_counter()
    earlier_seconds, last_loss = 0.0, float("nan")  # training time before a resume
    total = args.benchmark_steps + 5 if args.benchmark_steps else args.steps
    if args.checkpoint and os.path.exists(args.checkpoint) and not args.benchmark_steps:
        state = torch.load(args.checkpoint, weights_only=False)
        if state["steps"] != args.steps or state["seed"] != args.seed:
            raise SystemExit(f"{args.checkpoint} is a run of {state['steps']} steps with seed "
                             f"{state['seed']}, not {args.steps} and {args.seed}; remove it or "
                             "pass another --checkpoint.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        generator.set_state(state["torch_generator"])
        batches, epoch, step = state["batches"], state["epoch"], state["step"]
        seen, earlier_seconds, last_loss = state["seen"], state["seconds"], state["loss"]
        print(f"resumed from {args.checkpoint} at step {step}", flush=True)
    model.train()
    while step < total:
        if not batches:
            batches = pk_batches(labels, args.identities_per_batch, args.images_per_identity, rng)
            epoch += 1
        index = torch.from_numpy(batches.pop(0))
        images = augment(train_images[index], generator)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * schedule(step, args.steps, args.warmup_steps)
        _, logits, features = model(images)
        loss = F.cross_entropy(logits, labels_t[index], label_smoothing=args.label_smoothing)
        if args.triplet_weight:
            loss = loss + args.triplet_weight * batch_hard_triplet(
                features, labels_t[index], args.triplet_margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        last_loss = loss.item()
        if step == 5 and args.benchmark_steps:
            start, seen = time.perf_counter(), 0
        seen += len(index)
        if step % 50 == 0 or step == total:
            rate = seen / (earlier_seconds + time.perf_counter() - start)
            print(f"step {step}/{total} epoch {epoch} loss {last_loss:.4f} "
                  f"{rate:.1f} img/s", flush=True)
        if args.checkpoint and not args.benchmark_steps and (
                step % args.checkpoint_every == 0 or step == total):
            save_checkpoint(args.checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "numpy_rng": rng.bit_generator.state, "torch_generator": generator.get_state(),
                "batches": batches, "epoch": epoch, "step": step, "seen": seen, "loss": last_loss,
                "seconds": earlier_seconds + time.perf_counter() - start,
                "steps": args.steps, "seed": args.seed})
    training_seconds = earlier_seconds + time.perf_counter() - start
    rate = seen / training_seconds
    if args.benchmark_steps:
        print(f"torch peer training: {rate:.1f} images/s ({args.benchmark_steps} steps of "
              f"{len(index)}, {args.threads} threads)")
        return
    evaluation_start = time.perf_counter()
    query, q_pids, q_cams = read_folder(os.path.join(args.data, "query"))
    gallery, g_pids, g_cams = read_folder(os.path.join(args.data, "bounding_box_test"))
    results = market_eval(embed(model, query), embed(model, gallery), q_pids, g_pids, q_cams,
                          g_cams)
    results.update(step=step, epochs=epoch, train_images_per_second=rate,
                   train_seconds=training_seconds, final_loss=last_loss)
    print(f"final: rank-1 {results['rank1']:.4f}  mAP {results['mAP']:.4f}  "
          f"mINP {results['mINP']:.4f}  ({rate:.1f} img/s)")
    if args.output:
        data = os.path.basename(os.path.normpath(args.data))
        name = os.path.splitext(os.path.basename(args.output))[0]
        record = {"name": name, "recipe": "peers/torch_baseline.py",
                  "config": {**vars(args), "num_parts": 0, "embedding_dim": 256,
                             "dataset": f"folder:{args.data}", "data": data,
                             "torch": torch.__version__, "torchvision": torchvision.__version__},
                  "extra_flags": [], "results": results,
                  "wall_seconds": round(training_seconds + time.perf_counter() - evaluation_start)}
        with open(args.output + ".tmp", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
