"""Files in and out of cross-modal generation: prompt segments read from the command line's
`prompt=` (text), `prompt_image=` (a PNG / JPEG) and `prompt_audio=` (a WAV / FLAC / OGG), in
the order given, and the generated segment written in its natural form (text, PNG, WAV)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from armodal.tokenizers.multimodal import MultimodalTokenizer, Segment

__all__ = ["SEGMENT_ARGS", "segments_from_args", "read_image", "read_audio", "write_segment"]

# command-line key -> the modality its value is a prompt segment of
SEGMENT_ARGS = {"prompt": "text", "prompt_image": "image", "prompt_audio": "audio"}


def segments_from_args(args: list[str], tokenizer: MultimodalTokenizer) -> list[Segment]:
    """The prompt segments `key=value` arguments name, in command-line order."""
    segments = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in SEGMENT_ARGS:
            continue
        modality = SEGMENT_ARGS[key]
        if modality not in tokenizer.parts:
            raise ValueError(f"{key}=...: this run has no {modality!r} tokenizer; its "
                             f"modalities: {', '.join(tokenizer.parts)}")
        part = tokenizer.parts[modality]
        content = value if modality == "text" else \
            read_image(value, part) if modality == "image" else read_audio(value, part)
        segments.append((modality, content))
    return segments


def read_image(path: str, tokenizer: Any) -> Tensor:
    """(C, H, W) uint8 at the image tokenizer's size and channels (resized if it differs)."""
    from PIL import Image, UnidentifiedImageError

    channels = getattr(tokenizer, "channels", 1)
    height, width = tokenizer.image_size
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            pixels = torch.tensor(list(img.getdata()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"prompt_image={path!r} cannot be read as an image: {err}") from None
    return pixels.reshape(height, width, channels).permute(2, 0, 1).contiguous()


def read_audio(path: str, tokenizer: Any) -> Tensor:
    """(samples,) float waveform at the audio tokenizer's sample rate, channels mixed to mono;
    read as the audio domains read files (an empty file or a damaged rate is refused)."""
    from armodal.data.audio import read_audio as read_file

    try:
        return read_file(path, int(tokenizer.sample_rate))
    except ValueError as err:
        raise ValueError(f"prompt_audio={path!r} cannot be read as audio: {err}") from None


def write_segment(modality: str, contents: list, tokenizer: Any, out: Path) -> list[Path]:
    """Write generated images as one PNG grid at `out`.png, audio as `out`_<i>.wav, and text as
    `out`.txt (one line each); returns the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if modality == "image":
        from armodal.imagegen import save_grid

        return [save_grid(torch.stack(contents), out.with_suffix(".png"), nrow=len(contents))]
    if modality == "audio":
        import soundfile as sf

        paths = []
        for i, wave in enumerate(contents):
            path = out.with_name(f"{out.name}_{i}.wav")
            sf.write(path, torch.as_tensor(wave).reshape(-1).numpy(), int(tokenizer.sample_rate))
            paths.append(path)
        return paths
    path = out.with_suffix(".txt")
    path.write_text("".join(f"{c}\n" for c in contents))
    return [path]
