"""Decoding speed on CPU: armodal's generate() / beam_search() vs transformers' generate().

    python bench/generate.py

Both sides run the SAME random weights: a ~20M-parameter LlamaForCausalLM is built with
transformers, saved, and loaded into armodal with `armodal.hf.load_llama`. fp32, inference
mode, torch's default thread count. Each case decodes 128 new tokens after a 32-token prompt
(no eos in the config, so every row runs to full length): greedy with batch 1 and batch 8
(equal-length prompts), and beam search with 4 beams, batch 1. Each case is warmed up once,
then timed 3 times; the median counts. tokens/s = returned rows x new tokens / seconds (beams
beyond the returned best one are not counted). Greedy outputs must match token for token.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

from armodal.generation import DecodingConfig, generate
from armodal.hf import load_llama

SHAPE = dict(vocab_size=8192, hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
PROMPT_LEN, NEW_TOKENS, BEAMS = 32, 128, 4


def median_seconds(fn: Callable[[], list[list[int]]], runs: int) -> tuple[float, list[list[int]]]:
    """Warm up once, then the median wall time of `runs` calls, and the last call's tokens."""
    tokens = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def hf_decode(model, prompts: torch.Tensor, beams: int = 1) -> list[list[int]]:
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         num_beams=beams, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median)")
    args = parser.parse_args()

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        ours = load_llama(tmp, dtype=torch.float32)
    n_params = ours.num_params()
    assert n_params == sum(p.numel() for p in hf.parameters())
    print(f"model: Llama shape {SHAPE}")
    print(f"parameters: {n_params:,} (both sides, same weights)")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, prompt {PROMPT_LEN}, new {NEW_TOKENS}")

    prompts = torch.randint(0, SHAPE["vocab_size"], (8, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(1))
    greedy = DecodingConfig(strategy="greedy", max_new_tokens=NEW_TOKENS)
    figures = []
    with torch.inference_mode():
        for batch in (1, 8):
            rows = prompts[:batch]
            t_ours, ours_tokens = median_seconds(
                lambda rows=rows: generate(ours, rows, greedy).sequences, args.runs)
            t_hf, hf_tokens = median_seconds(lambda rows=rows: hf_decode(hf, rows), args.runs)
            assert ours_tokens == hf_tokens, f"greedy batch {batch}: tokens differ from HF"
            print(f"greedy_b{batch}: armodal tokens == transformers tokens "
                  f"({batch} x {NEW_TOKENS})")
            figures.append((f"greedy_b{batch}", batch * NEW_TOKENS, t_ours, t_hf))

        try:
            from armodal.generation.beam import beam_search
        except ImportError as err:
            print(f"beam4_b1: skipped, armodal beam search is not available ({err})")
        else:
            rows = prompts[:1]
            beam = DecodingConfig(strategy="beam", num_beams=BEAMS, max_new_tokens=NEW_TOKENS,
                                  beam_length="hf")
            t_ours, ours_tokens = median_seconds(
                lambda: beam_search(ours, rows.tolist(), beam).sequences, args.runs)
            t_hf, hf_tokens = median_seconds(lambda: hf_decode(hf, rows, BEAMS), args.runs)
            same = "==" if ours_tokens == hf_tokens else "!="
            print(f"beam4_b1: armodal tokens {same} transformers tokens")
            figures.append(("beam4_b1", NEW_TOKENS, t_ours, t_hf))

    for name, tokens, t_ours, t_hf in figures:
        ours_rate, hf_rate = tokens / t_ours, tokens / t_hf
        print(f"figure {name}: {ours_rate:.1f} tokens/s | peer transformers {hf_rate:.1f} "
              f"tokens/s | ratio {ours_rate / hf_rate:.2f}")


if __name__ == "__main__":
    main()
