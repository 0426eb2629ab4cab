"""Train the testbed generator on procedural scenes, with condition dropout so that CFG works.

    python -m tokenmerge.testbed.train --out src/tokenmerge/testbed/weights/testbed --steps 20000

Epsilon prediction on a cosine noise schedule, AdamW, an exponential moving average of the weights (the
EMA is what is saved, in float16 safetensors). The held-out (shape, colour) pairs are never shown.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import make_batch
from .pipeline import IMAGE_SIZE, MAX_TOKENS, TestbedPipeline, build_models


def train(out: Path, steps: int, batch: int = 64, lr: float = 3e-4, width: int = 64, samples: int = 40000,
          dropout: float = 0.1, ema_decay: float = 0.999, seed: int = 0, device: str = "cpu") -> TestbedPipeline:
    torch.manual_seed(seed)
    unet, text_encoder, tokenizer, scheduler = build_models(width, seed)
    unet.to(device).train()
    text_encoder.to(device).train()
    images, scenes = make_batch("train", samples, IMAGE_SIZE)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    captions = [scene.caption for scene in scenes]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = min(500, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    gen = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod.to(device)
    progress = tqdm(range(steps), desc="training testbed")
    for step in progress:
        idx = torch.randint(samples, (batch,), generator=gen)
        x0 = pixels[idx].to(device)
        text = ["" if torch.rand((), generator=gen) < dropout else captions[i] for i in idx.tolist()]
        tokens = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                           return_tensors="pt").input_ids.to(device)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (step + 1) / (step + 10))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    pipe = TestbedPipeline(unet=ema_unet.half().cpu(), text_encoder=ema_text.half().cpu(), tokenizer=tokenizer,
                           scheduler=scheduler)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    train(args.out, args.steps, args.batch, args.lr, args.width, args.samples, seed=args.seed, device=args.device)
    print(f"trained {args.steps} steps in {(time.perf_counter() - start) / 60:.1f} min on {args.device}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
