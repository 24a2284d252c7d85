"""Text in, text out for a trained run: what `armodal generate` does, as plain functions."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable
from typing import TextIO

import torch

from armodal.checkpoint import LoadedRun
from armodal.generation import DecodingConfig, fit_to_context, generate, stream
from armodal.generation.repetition import format_report, repetition_report
from armodal.tokenizers.base import Tokenizer
from armodal.tokenizers.space import TokenSpace


def encode_prompt(tokenizer: Tokenizer, space: TokenSpace, prompt: str) -> list[int]:
    """bos + the prompt's global ids."""
    local = tokenizer.encode(prompt) if prompt else torch.zeros(0, dtype=torch.long)
    return [space.bos_id] + space.to_global(tokenizer.modality, local).tolist()


def decode_text(tokenizer: Tokenizer, space: TokenSpace, ids: list[int]) -> str:
    """Global ids to text; structural tokens (eos, pad) are dropped."""
    segments = space.split(torch.tensor(ids, dtype=torch.long))
    return "".join(tokenizer.decode(local) for modality, local in segments
                   if modality == tokenizer.modality)


def read_prompts(prompt: str | None, prompt_file: str | None,
                 stdin: TextIO | None = None) -> list[str]:
    """The prompt, or one prompt per line of prompt_file ("-": standard input)."""
    if prompt_file is None:
        return [prompt or ""]
    if prompt:
        raise ValueError("give either prompt= or prompt_file=, not both")
    if prompt_file == "-":
        lines = (stdin or sys.stdin).read().splitlines()
    else:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt_file {prompt_file!r} does not exist; give a text "
                                    f"file with one prompt per line, or - for stdin") from None
    if not lines:
        raise ValueError(f"prompt_file {prompt_file!r} holds no prompts (one per line)")
    return lines


def decoding_for(model: torch.nn.Module, space: TokenSpace, requested: DecodingConfig,
                 longest_prompt: int, warn: TextIO | None = None) -> DecodingConfig:
    """The request with the space's eos as a stop token, fitted to the model's context
    (a note on `warn`, stderr by default, when max_new_tokens had to be cut)."""
    stops = tuple(dict.fromkeys((*requested.stop_token_ids, space.eos_id)))
    decoding = fit_to_context(dataclasses.replace(requested, stop_token_ids=stops), model,
                              longest_prompt)
    if decoding.max_new_tokens < requested.max_new_tokens:
        print(f"note: max_new_tokens={requested.max_new_tokens} cut to "
              f"{decoding.max_new_tokens}, the room left in the model's "
              f"{model.config.max_seq_len}-token context (decoding.attention_sinks=4 decodes "
              f"past it)", file=warn or sys.stderr)
    return decoding


def check_draft_run(run: LoadedRun, draft: LoadedRun | None) -> None:
    """A draft run must turn text into the very same token ids as the target run."""
    if draft is None:
        return
    if draft.space.to_dict() != run.space.to_dict() or \
            draft.tokenizer.config() != run.tokenizer.config():
        raise ValueError(f"draft run {draft.path} does not share the TokenSpace and tokenizer "
                         f"of {run.path}; a draft must be trained on the same token ids")


def report_speculative(out, file: TextIO | None = None) -> None:
    """One line on stderr with the call's acceptance figures (speculative decoding only)."""
    stats = out.speculative
    if stats is None:
        return
    print(f"speculative: accepted {stats.accepted}/{stats.drafted} drafted tokens "
          f"({stats.acceptance_rate:.1%}), {stats.tokens_per_step:.2f} tokens per target "
          f"forward, {stats.tokens_per_second:.1f} tokens/s", file=file or sys.stderr)


def report_repetition(sequences: list[list[int]], file: TextIO | None = None) -> None:
    """The repetition table (distinct-n, rep-4, trailing loop) of the generated tokens, on
    stderr: stdout keeps exactly the text or JSON lines it has without the report."""
    print(format_report(repetition_report(sequences)), file=file or sys.stderr)


def _check_report(report: object) -> None:
    if not isinstance(report, bool):
        raise ValueError(f"report={report!r}; expected true or false")


def generate_text(run: LoadedRun, prompts: list[str], requested: DecodingConfig,
                  draft: LoadedRun | None = None, report: bool = False) -> list[dict]:
    """One record per output row: prompt, text, tokens, logprobs, finish reason (+ extras).
    report: also print the repetition table of the generated tokens on stderr."""
    _check_report(report)
    check_draft_run(run, draft)
    ids = [encode_prompt(run.tokenizer, run.space, p) for p in prompts]
    decoding = decoding_for(run.model, run.space, requested, max(len(i) for i in ids))
    decode = _decoder(run)
    out = generate(run.model, ids, decoding, decode=decode,
                   draft=draft.model if draft is not None else None)
    report_speculative(out)
    if report:
        report_repetition(out.sequences)
    n = decoding.num_return_sequences
    records = []
    for row, tokens in enumerate(out.sequences):
        text = out.texts[row] if out.texts is not None else decode(tokens)  # beam: no texts
        record = {"prompt": prompts[row // n], "text": text, "tokens": tokens,
                  "logprobs": out.logprobs[row], "finish_reason": out.finish_reasons[row]}
        if out.top_logprobs is not None:
            record["top_logprobs"] = out.top_logprobs[row]
        if out.scores is not None:
            record["score"] = out.scores[row]
        records.append(record)
    return records


def stream_text(run: LoadedRun, prompt: str, requested: DecodingConfig,
                draft: LoadedRun | None = None, report: bool = False) -> Iterable[str]:
    """The prompt, then pieces of generated text as they are produced (one row).
    report: at the end, print the repetition table of the generated tokens on stderr."""
    _check_report(report)
    check_draft_run(run, draft)
    ids = encode_prompt(run.tokenizer, run.space, prompt)
    decoding = decoding_for(run.model, run.space, requested, len(ids))
    yield prompt
    events = stream(run.model, [ids], decoding, decode=_decoder(run),
                    draft=draft.model if draft is not None else None)
    while True:
        try:
            yield next(events).text
        except StopIteration as done:  # the generator's return value: the whole output
            report_speculative(done.value)
            if report:
                print(file=sys.stderr)  # the streamed text has no newline of its own yet
                report_repetition(done.value.sequences)
            return


def write_records(records: list[dict], fmt: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: tests and callers may swap sys.stdout
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record) + "\n")
        return
    for i, record in enumerate(records):
        if len(records) > 1:
            out.write(f"--- sample {i} ({record['finish_reason']})\n")
        out.write(record["prompt"] + record["text"] + "\n")


def _decoder(run: LoadedRun):
    return lambda tokens: decode_text(run.tokenizer, run.space, tokens)
