"""`armodal train|generate|eval`: thin wrappers that compose a Hydra config and call a function.

    armodal train [recipe] key=value ...          recipe: a name in recipes/ or a .yaml path
    armodal generate run=<dir> prompt="..." decoding=<preset> decoding.temperature=0.7
    armodal generate run=<dir> prompt_file=prompts.txt format=jsonl   (prompt_file=- : stdin)
    armodal eval run=<dir> [data=<file|folder|glob>] [quantize=int8|int4|bf16]
    armodal eval run=<text run dir> context=1024 rope.scaling=yarn   (loss by position bucket)
    armodal eval run=<action run dir> actions.episodes=50 actions.target_return=[100,500]
    armodal generate run=<dir> prompt="..." decoding=speculative draft_run=<smaller run dir>
    armodal generate run=<image run dir> image.classes=[3,7] decoding.cfg_scale=2   (PNG grid)
    armodal generate run=<audio run dir> audio.seconds=2 audio.prompt=val   (WAV + PNG files)
    armodal generate run=<video run dir> video.prompt_frames=3   (GIF + frame strip PNG)
    armodal generate run=<mixed run dir> prompt_image=digit.png multimodal.next=text
    armodal generate run=<mixed run dir> prompt="a handwritten seven" multimodal.next=image
    armodal serve run=<dir> port=8000 max_batch=32   (OpenAI-compatible HTTP server)

A mistake in the command or the config is reported in one line (exit status 2); --debug (or
HYDRA_FULL_ERROR=1) shows the full traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from armodal.cli_errors import UsageError, friendly_errors

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"
DEFAULT_RECIPE = "text_code_cpu"
USAGE = __doc__.split("\n\n", 1)[1]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(recipe: str) -> tuple[Path, str]:
    """A recipe name or a path to a .yaml file -> (config dir, config name)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or "/" in recipe:
        path = path if path.suffix else path.with_suffix(".yaml")
        if path.is_file():
            return path.resolve().parent, path.stem
    elif (RECIPES_DIR / f"{recipe}.yaml").is_file():
        return RECIPES_DIR, recipe
    raise UsageError(f"unknown recipe {recipe!r}; available: {', '.join(available_recipes())} "
                     f"(or a path to a .yaml recipe)")


def compose_config(config_dir: Path, name: str, overrides: list[str]):
    """Compose like `armodal train` does, for tests and tools: conf/ is on the search path."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir), version_base=None):
        return compose(name, overrides=[*overrides, f"hydra.searchpath=[file://{CONF_DIR}]"])


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    # Hydra's `~key` deletes a key and needs no "=": an override, not a recipe name
    positional = [a for a in args if "=" not in a and not a.startswith(("-", "~"))]
    if len(positional) > 1:
        raise UsageError(f"expected at most one recipe before key=value overrides, "
                         f"got {positional}")
    return (positional[0] if positional else None), [a for a in args if a not in positional]


def quiet_lightning() -> None:
    """Drop Lightning's advertising tips and a deprecation warning it raises against new torch:
    neither is actionable for an armodal user, and they bury the progress and summary."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def run_train(args: list[str]) -> None:
    import hydra

    from armodal.config_checks import check_train_config
    from armodal.train import train

    recipe, overrides = split_args(args)
    config_dir, name = resolve_recipe(recipe or DEFAULT_RECIPE)
    quiet_lightning()
    if not {"-m", "--multirun"} & set(overrides):
        # Compose and check here first, so that a wrong key or value is one line now, not
        # Hydra's multi-line report, nor an error after minutes of tokenizer fitting.
        # (A sweep's values are checked per job, in train().)
        with friendly_errors("train", lambda: compose_config(config_dir, name, [])):
            check_train_config(compose_config(config_dir, name, overrides))

    def task(cfg) -> None:
        with friendly_errors("train"):
            train(cfg)

    # Hand the overrides (and -m / --multirun, --cfg job, ...) to Hydra's own argument parser.
    # A given run_dir is also Hydra's output dir (its cli.log goes there), rather than a
    # second, near-empty runs/<name>/<timestamp> beside it.
    run_dirs = [a.split("=", 1)[1] for a in overrides if a.startswith("run_dir=")]
    hydra_dir = [f"hydra.run.dir={run_dirs[-1]}"] if run_dirs and run_dirs[-1] != "null" else []
    sys.argv = ["armodal train", *overrides, *hydra_dir, f"hydra.searchpath=[file://{CONF_DIR}]"]
    hydra.main(config_path=str(config_dir), config_name=name, version_base=None)(task)()


def run_generate(args: list[str]) -> None:
    import dataclasses

    from hydra.utils import instantiate

    from armodal.checkpoint import load_run
    from armodal.crossmodal_io import SEGMENT_ARGS
    from armodal.textgen import generate_text, read_prompts, stream_text, write_records

    # The prompt is taken verbatim: Hydra's override grammar would strip its spaces and
    # reinterpret quotes, brackets and escapes, and a prompt is text, not a config value.
    raw = [a.split("=", 1)[1] for a in args if a.startswith("prompt=")]
    segment_args = [a for a in args if a.split("=", 1)[0] in SEGMENT_ARGS]
    cfg = compose_config(CONF_DIR, "generate", [a for a in args if a not in segment_args])
    if cfg.format not in ("text", "jsonl"):
        raise UsageError(f"format={cfg.format!r}; use text or jsonl")
    prompts = read_prompts(raw[-1] if raw else cfg.prompt, cfg.prompt_file)
    decoding = instantiate(cfg.decoding)
    if cfg.draft_run is not None and decoding.speculative is None:
        decoding = dataclasses.replace(decoding, speculative="draft")  # draft_run implies it
    run = load_run(cfg.run, cfg.device, quantize=cfg.quantize)
    if cfg.parallel.tp > 1:  # one of tp ranks (torchrun --nproc_per_node <tp>), 1/tp of the heads
        from armodal.parallel import tensor_parallel_generation

        tensor_parallel_generation(run, cfg.parallel.tp, decoding, cfg.draft_run, cfg.quantize)
    if run.tokenizer.modality == "multimodal":
        return generate_next_segment(run, cfg, decoding, segment_args)
    if segment_args != [a for a in args if a.startswith("prompt=")]:
        raise UsageError(f"prompt_image= and prompt_audio= are for mixed-modality runs; "
                         f"{run.path} is a {run.tokenizer.modality} run")
    if "video" in run.meta:  # before images: a video run's tokenizer is an image tokenizer
        return generate_video(run, cfg, decoding, bool(raw) or cfg.prompt_file is not None)
    if run.tokenizer.modality == "image":
        return generate_image_grid(run, cfg, decoding, bool(raw) or cfg.prompt_file is not None)
    if run.tokenizer.modality == "audio":
        return generate_audio_files(run, cfg, decoding, bool(raw) or cfg.prompt_file is not None)
    if run.tokenizer.modality == "action":
        raise UsageError(f"{run.path} is an action run: it acts in its environment rather than "
                         f"generating; play it with `armodal eval run={run.path}`")
    draft = None if cfg.draft_run is None else load_run(cfg.draft_run, cfg.device,
                                                        quantize=cfg.quantize)
    if cfg.format == "text" and len(prompts) == 1 and decoding.num_return_sequences == 1 \
            and decoding.strategy != "beam":
        # Printed as tokens arrive.
        for piece in stream_text(run, prompts[0], decoding, draft, report=cfg.report):
            print(piece, end="", flush=True)
        print()
        return
    write_records(generate_text(run, prompts, decoding, draft, report=cfg.report), cfg.format)


def generate_next_segment(run, cfg, decoding, segment_args: list[str]) -> None:
    """Mixed-modality runs: the prompt segments in command-line order, then one segment in
    multimodal.next, printed (text) or written (PNG / WAV)."""
    from armodal.crossmodal import next_segment
    from armodal.crossmodal_io import segments_from_args, write_segment

    opts = cfg.multimodal
    if not isinstance(opts.num_samples, int) or opts.num_samples < 1:
        raise UsageError(f"multimodal.num_samples={opts.num_samples!r}: expected an int >= 1")
    try:
        segments = segments_from_args(segment_args, run.tokenizer)
        results = next_segment(run.model, run.tokenizer, [segments] * opts.num_samples,
                               opts.next, decoding)
    except ValueError as err:
        raise UsageError(str(err)) from None
    contents = [content for content, _ in results]
    if opts.next == "text":
        for text in contents:
            print(text)
        return
    out = Path(opts.out) if opts.out else run.path / "generated" / opts.next
    for path in write_segment(opts.next, contents, run.tokenizer.part(opts.next), out):
        print(f"wrote {path}")


def generate_video(run, cfg, decoding, prompted: bool) -> None:
    from omegaconf import OmegaConf

    from armodal.videogen import generate_video_files

    if prompted or cfg.draft_run is not None:
        raise UsageError(f"{run.path} is a video run: it takes no text prompt, prompt_file or "
                         f"draft_run; choose video.num_clips, video.prompt_frames, video.prompt "
                         f"(val or a GIF / PNG strip) (see conf/generate.yaml)")
    for path in generate_video_files(run, OmegaConf.to_container(cfg.video), decoding):
        print(f"wrote {path}")


def generate_image_grid(run, cfg, decoding, prompted: bool) -> None:
    from omegaconf import OmegaConf

    from armodal.imagegen import generate_grid

    if prompted or cfg.draft_run is not None:
        raise UsageError(f"{run.path} is an image run: it takes no prompt, prompt_file or "
                         f"draft_run; choose image.classes, image.num_images, "
                         f"image.complete_rows (see conf/generate.yaml)")
    opts = OmegaConf.to_container(cfg.image)
    path, per_row = generate_grid(run, decoding, **opts)
    print(f"wrote {path} ({per_row} images per row)")


def generate_audio_files(run, cfg, decoding, prompted: bool) -> None:
    from omegaconf import OmegaConf

    from armodal.audiogen import generate_audio

    if prompted or cfg.draft_run is not None:
        raise UsageError(f"{run.path} is an audio run: it takes no text prompt, prompt_file or "
                         f"draft_run; choose audio.num_samples, audio.seconds, audio.prompt "
                         f"(a sound file or val) (see conf/generate.yaml)")
    for path in generate_audio(run, decoding, **OmegaConf.to_container(cfg.audio)):
        print(f"wrote {path} (+ {path.with_suffix('.png').name})")


def run_eval(args: list[str]) -> None:
    from armodal.evaluate import evaluate

    cfg = compose_config(CONF_DIR, "eval", args)
    if is_action_run(cfg.run):
        return eval_action_run(cfg)
    if is_multimodal_run(cfg.run):
        return eval_multimodal_run(cfg)
    result = evaluate(cfg.run, data=cfg.data, pattern=cfg.pattern, batch_size=cfg.batch_size,
                      max_batches=cfg.max_batches, device=cfg.device, quantize=cfg.quantize,
                      context=cfg.context, rope_scaling=cfg.rope.scaling,
                      rope_factor=cfg.rope.factor)
    print(f"{result.data}: {result.tokens} tokens, loss {result.nll:.4f} nats/token, "
          f"perplexity {result.ppl:.3f}, {result.bits_per_unit:.4f} bits/{result.unit}")
    if result.by_position is not None and len(result.by_position) > 1:
        print(result.position_table())
    print(json.dumps(result.as_dict()))


def is_action_run(run_dir: str) -> bool:
    config = Path(run_dir).expanduser() / "config.json"
    return config.is_file() and "action" in json.loads(config.read_text())


def is_multimodal_run(run_dir: str) -> bool:
    config = Path(run_dir).expanduser() / "config.json"
    return config.is_file() and bool({"multimodal", "prefix"} & set(json.loads(config.read_text())))


def eval_multimodal_run(cfg) -> None:
    from omegaconf import OmegaConf

    from armodal.checkpoint import load_run
    from armodal.crossmodal_eval import (
        evaluate_digit_captions,
        evaluate_speech_transcripts,
        mixture_source,
    )

    if cfg.data is not None:
        raise UsageError(f"data={cfg.data!r}: a mixed-modality run is evaluated on its own "
                         f"held-out pairs; leave data unset")
    if "prefix" in json.loads((Path(cfg.run).expanduser() / "config.json").read_text()):
        from armodal.prefix_train import evaluate_prefix_run

        result = evaluate_prefix_run(cfg.run)
        print(f"image -> text  {result['image_to_text_accuracy']:6.1%} of "
              f"{result['captioned_images']} held-out images captioned with their digit "
              f"(greedy, from {result['encoder']} prefix embeddings)")
        print(json.dumps(result))
        return
    run = load_run(cfg.run, cfg.device, quantize=cfg.quantize)
    try:
        if mixture_source(run, "SpeechTranscripts") is not None:
            result = evaluate_speech_transcripts(run, **OmegaConf.to_container(cfg.speech))
        else:
            result = evaluate_digit_captions(run, **OmegaConf.to_container(cfg.digits))
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(result.table())
    print(json.dumps(result.as_dict()))


def eval_action_run(cfg) -> None:
    from omegaconf import OmegaConf

    from armodal.checkpoint import load_run
    from armodal.control.evaluate import evaluate_run

    if cfg.data is not None:
        raise UsageError(f"data={cfg.data!r}: an action run is evaluated by playing episodes "
                         f"in its environment; leave data unset")
    run = load_run(cfg.run, cfg.device, quantize=cfg.quantize)
    result = evaluate_run(run, **OmegaConf.to_container(cfg.actions))
    print(result.table())
    print(json.dumps(result.as_dict()))


def run_serve(args: list[str]) -> None:
    """`armodal serve`: load the run, then serve it under uvicorn until SIGINT / SIGTERM."""
    import torch
    from omegaconf import OmegaConf

    from armodal.checkpoint import load_run
    from armodal.serve.server import serve
    from armodal.serve.settings import ServerSettings

    opts = OmegaConf.to_container(compose_config(CONF_DIR, "serve", args), resolve=True,
                                  throw_on_missing=True)
    run_dir, quantize, log_level = opts.pop("run"), opts.pop("quantize"), opts.pop("log_level")
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if log_level not in levels:
        raise UsageError(f"log_level={log_level!r}; use one of {', '.join(levels)}")
    settings = ServerSettings(**opts)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    serve(load_run(run_dir, settings.device, quantize=quantize), settings, log_level)


COMMANDS = {"train": run_train, "generate": run_generate, "eval": run_eval, "serve": run_serve}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors show their traceback too
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = args[0]
    if command not in COMMANDS:
        with friendly_errors(command):
            raise UsageError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    # train composes its recipe and names its own; generate and eval compose conf/<command>.yaml
    base_config = None if command == "train" else (lambda: compose_config(CONF_DIR, command, []))
    with friendly_errors(command, base_config):
        COMMANDS[command](args[1:])


if __name__ == "__main__":
    main()
