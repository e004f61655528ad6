"""
Pairs/s of one contrastive.py training step (forward, loss, backward, Adam) on the
full-size CLIP ViT-B/32 with random weights, next to the same step written with transformers'
CLIPModel on the same weights, measured in the same run:

    python tests/bench_contrastive.py            # batch 32 (paper 4.3), 3 timed steps per case
    python tests/bench_contrastive.py --quick    # 1 timed step per case (a smoke run, noisy numbers)

On CUDA it also prints the achieved TFLOP/s against the card's dense bfloat16 peak.
"""
import argparse
import os
import sys
import tempfile
from contextlib import nullcontext

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from bench import encoder_flops, save_hf_clip, timed_dtypes, timeit  # noqa: E402 (needs the path above)

# dense bfloat16 tensor-core peaks in TFLOP/s, by a piece of torch.cuda.get_device_name()
PEAK_BF16 = {'H200': 989, 'H100 PCIe': 756, 'H100': 989, 'A100': 312, 'L40S': 362, 'L4': 121, 'A10G': 70}


def step_flops(config, B, T):
    """FLOPs of one training step (forward + backward = 3 x forward) for B pairs with T-token captions"""
    v, t = config.vision_config, config.text_config
    n = (v.image_size // v.patch_size) ** 2
    vision = encoder_flops(B * (n + 1), B, n + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers) \
        + 2 * B * n * v.hidden_size * 3 * v.patch_size ** 2
    text = encoder_flops(B * T, B, T, t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    return 3 * (vision + text)


def bench_contrastive(quick=False, batch=32, caption_tokens=20):
    """prints and returns {(device, dtype): (ours pairs/s, transformers pairs/s)}"""
    import transformers as hf
    import contrastive
    import data

    torch.manual_seed(0)
    iters = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_clip(tmp)  # full-size ViT-B/32, random weights
        ref = hf.CLIPModel.from_pretrained(tmp, attn_implementation='sdpa').train()
        ours = data.load_encoder(tmp)[0].train()
    B, T = batch, caption_tokens
    eot = ref.config.text_config.eos_token_id
    ids = torch.randint(0, eot - 1, (B, T))
    ids[:, -1] = eot  # both models pool at the end-of-text token, the last one here
    mask = torch.ones(B, T, dtype=torch.long)
    px = torch.randn(B, 3, 224, 224)
    flops = step_flops(ours.config, B, T)
    print(f"contrastive training step: batch {B}, captions of {T} tokens, {iters} timed step(s), torch {torch.__version__}, "
          f"transformers {hf.__version__}, {torch.get_num_threads()} threads")
    print(f"{'device':6} {'dtype':8} {'ours pairs/s':>12} {'hf pairs/s':>10} {'ours/hf':>7} {'TFLOP/s':>8} {'% peak':>6}")
    results = {}
    for device in ['cpu'] + (['cuda'] if torch.cuda.is_available() else []):
        x, i, m = px.to(device), ids.to(device), mask.to(device)
        towers = ours.to(device)  # forward: both towers and the log scale, as contrastive.py calls it
        ref.to(device)

        def ref_forward():
            img = ref.get_image_features(pixel_values=x)
            txt = ref.get_text_features(input_ids=i, attention_mask=m)
            return getattr(img, 'pooler_output', img), getattr(txt, 'pooler_output', txt), ref.logit_scale

        for dtype in timed_dtypes(device):
            ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == 'bfloat16' else nullcontext
            steps = []
            for forward, model in ((lambda: towers(x, i, m), ours), (ref_forward, ref)):
                opt = torch.optim.Adam(model.parameters(), lr=1e-6, fused=device == 'cuda')

                def step(forward=forward, model=model, opt=opt):  # contrastive.py's step, unclipped as by default
                    with ctx():
                        img, txt, scale = forward()
                    contrastive.clip_loss(img, txt, scale, 'ce').backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                steps.append(step)
            rates = [B / t for t in timeit(steps, iters, device)]  # interleaved: load hits both alike
            del steps
            tflops = flops * rates[0] / B / 1e12
            peak = next((p for k, p in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None) \
                if device == 'cuda' and dtype == 'bfloat16' else None
            print(f"{device:6} {dtype:8} {rates[0]:12.1f} {rates[1]:10.1f} {rates[0] / rates[1]:6.2f}x {tflops:8.2f} "
                  f"{f'{100 * tflops / peak:5.0f}%' if peak else '     -'}", flush=True)
            results[device, dtype] = tuple(rates)
    return results


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='1 timed step per case (a smoke run, noisy numbers)')
    parser.add_argument('--batch', type=int, default=32, help='pairs per step (paper 4.3: 32)')
    parser.add_argument('--tokens', type=int, default=20, help='caption length in tokens (Memento captions are short)')
    args = parser.parse_args()
    bench_contrastive(args.quick, args.batch, args.tokens)
