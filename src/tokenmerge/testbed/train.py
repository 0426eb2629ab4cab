"""Train the testbed generator on procedural scenes, with condition dropout so that CFG works.

    python -m tokenmerge.testbed.train --out src/tokenmerge/testbed/weights/testbed --steps 20000

Epsilon prediction on a cosine noise schedule, AdamW, an exponential moving average of the weights (the
EMA is what is saved, in float16 safetensors). The held-out (shape, colour) pairs are never shown. The whole
training set (images and token ids) lives on the device, so a step is a few index ops plus the model; on a GPU
the model runs under bfloat16 autocast. ``--minutes`` stops early at a time budget (the step count reached is
printed: rerun with ``--steps`` that count to reproduce it).
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
          dropout: float = 0.1, ema_decay: float = 0.999, seed: int = 0, device: str = "cpu",
          minutes: float | None = None, workers: int = 1, checkpoint_every: int | None = None,
          init: Path | None = None) -> TestbedPipeline:
    """Train and save the EMA pipeline to ``out``; returns it. Stops after ``steps`` or ``minutes``.

    ``init``: a saved testbed pipeline to continue from (its weights start both the model and the EMA).
    """
    torch.manual_seed(seed)
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    unet, text_encoder, tokenizer, scheduler = build_models(width, seed)
    if init is not None:
        start_from = TestbedPipeline.from_pretrained(init, use_safetensors=True)
        unet.load_state_dict(start_from.unet.float().state_dict())
        text_encoder.load_state_dict(start_from.text_encoder.float().state_dict())
    unet.to(device).train()
    text_encoder.to(device).train()
    images, scenes = make_batch("train", samples, IMAGE_SIZE, workers=workers)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 on the device
    def token_ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    captions, empty = token_ids([scene.caption for scene in scenes]), token_ids([""])

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = min(500, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    gen = torch.Generator(device).manual_seed(seed)
    alphas = scheduler.alphas_cumprod.to(device)

    def save() -> TestbedPipeline:
        pipe = TestbedPipeline(unet=copy.deepcopy(ema_unet).half().cpu(), text_encoder=copy.deepcopy(ema_text).half().cpu(),
                               tokenizer=tokenizer, scheduler=scheduler)
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        return pipe

    start = time.perf_counter()
    deadline = None if minutes is None else start + 60 * minutes
    progress = tqdm(range(steps), desc="training testbed", mininterval=5)
    for step in progress:
        idx = torch.randint(samples, (batch,), generator=gen, device=device)
        x0 = pixels[idx].float().div_(127.5).sub_(1)
        dropped = torch.rand(batch, generator=gen, device=device) < dropout
        tokens = torch.where(dropped[:, None], empty, captions[idx])
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=on_gpu):
            pred = unet(noisy, t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (step + 1) / (step + 10))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 100 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")  # one sync per 100 steps
        if checkpoint_every and step and step % checkpoint_every == 0:
            save()
        if deadline is not None and time.perf_counter() > deadline:
            progress.write(f"time budget of {minutes:g} min reached after {step + 1} steps")
            break
    pipe = save()
    progress.write(f"trained {step + 1} steps (batch {batch}) in {(time.perf_counter() - start) / 60:.1f} min on "
                   f"{device}; wrote {out}")
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=40000, help="training images rendered up front")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=None, help="stop at this time budget")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering the training images")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="save the EMA pipeline every N steps")
    parser.add_argument("--init", type=Path, default=None, help="continue from this saved testbed pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.batch, args.lr, args.width, args.samples, ema_decay=args.ema_decay,
          seed=args.seed, device=args.device, minutes=args.minutes, workers=args.workers,
          checkpoint_every=args.checkpoint_every, init=args.init)


if __name__ == "__main__":
    main()
