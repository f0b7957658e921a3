"""Zero-shot class prediction from text prompts in the language-aligned embedding space.

Each class is described by a few sentences (a YAML file ``{class_name: [description, ...]}``);
the frozen text encoder embeds them as a prompt ensemble with
:func:`hlss.models.text.embed_prompts` (cached on disk per encoder and prompts), and an image's
class probabilities are the softmax of its cosine similarities to the class embeddings divided by
a temperature.

Which ensembling code runs: for an open_clip text tower
(:class:`hlss.models.text.OpenCLIPTextEncoder`: a model with ``encode_text`` and a tokenizer)
open_clip's ``open_clip.zero_shot_classifier.build_zero_shot_classifier``; for the
sentence-transformers and tiny encoders (no ``encode_text``/tokenizer) the hand-written
:func:`hlss.models.text.ensemble`. Both mean the same (normalise each sentence, average per class,
renormalise) and agree up to float rounding.

The packaged prompt files (``hlss/models/prompts/*.yaml``; ``opensrh_classes`` for the seven
OpenSRH classes) are loaded by bare name; anything else is a path to the user's own file.

Typical use::

    prompts = load_class_prompts("opensrh_classes", CLASSES_OPENSRH)
    class_text = embed_prompts(encoder, prompts, cache_dir)      # [C, D]
    probs = zero_shot_scores(text_space, class_text)             # [n, C]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hlss.errors import ConfigError, HLSSError
from hlss.eval.arrays import check_2d, rows_f32
from hlss.models.packaged import load_packaged_or_file, packaged_names
from hlss.progress import Progress

PROMPTS_FOLDER = "prompts"


def packaged_prompt_names() -> list[str]:
    """Names of the class-prompt files shipped with the package (e.g. ``["opensrh_classes"]``)."""
    return packaged_names(PROMPTS_FOLDER)


def load_class_prompts(path_or_name: str, classes: Sequence[str]) -> list[list[str]]:
    """Read the class descriptions for ``classes`` from a prompt YAML file.

    The file is a mapping ``{class_name: [description, ...]}``. Class names are matched exactly
    (after stripping surrounding whitespace) against ``classes``.

    Args:
        path_or_name: a packaged prompt-file name (``"opensrh_classes"``) or a path to a YAML file.
        classes: the ``C`` class names, in label-index order.

    Returns:
        ``C`` non-empty lists of stripped sentences; ``result[c]`` describes ``classes[c]``
        (ready for :func:`hlss.models.text.embed_prompts`).

    Raises:
        ConfigError: (one line naming the file) missing or unreadable file, malformed YAML, a
            document that is not a mapping, a class of ``classes`` without descriptions (absent,
            empty list, or an empty / non-text description), or a class in the file that is not
            in ``classes``.
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise ConfigError(f"class prompts {path_or_name!r}: no classes given")
    where, doc = load_packaged_or_file(path_or_name, PROMPTS_FOLDER, "class prompt file")
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping {{class_name: [description, ...]}}")

    entries: dict[str, object] = {str(k).strip(): v for k, v in doc.items()}
    unknown = [k for k in entries if k not in classes]
    if unknown:
        raise ConfigError(
            f"{where}: unknown class {unknown[0]!r} (expected classes: {', '.join(classes)})"
        )
    out: list[list[str]] = []
    for c in classes:
        descs = entries.get(c)
        if descs is None:
            raise ConfigError(f"{where}: class {c!r} has no descriptions")
        if isinstance(descs, str):
            descs = [descs]
        if not isinstance(descs, list) or not descs:
            raise ConfigError(f"{where}: class {c!r} needs a non-empty list of descriptions")
        for d in descs:
            if not isinstance(d, str) or not d.strip():
                raise ConfigError(f"{where}: class {c!r} has an empty or non-text description")
        out.append([d.strip() for d in descs])
    return out


def zero_shot_scores(
    text_space: np.ndarray | torch.Tensor,
    class_text: np.ndarray | torch.Tensor,
    temperature: float = 0.01,
    chunk_size: int = 65536,
) -> np.ndarray:
    """Zero-shot class probabilities: ``softmax(cos(image, class) / temperature)``.

    Both inputs are L2-normalised here (rows of zeros stay zero and get uniform probabilities),
    so unnormalised or float16 embeddings are fine. Rows are processed ``chunk_size`` at a time in
    float32, so a float16 ``[n, D]`` array is never copied whole; progress is reported per chunk
    (:class:`hlss.progress.Progress`).

    Args:
        text_space: ``[n, D]`` image embeddings in the text space (numpy or torch, any float
            dtype).
        class_text: ``[C, D]`` class text embeddings (e.g. from
            :func:`hlss.models.text.embed_prompts`).
        temperature: softmax temperature ``tau`` (> 0); small values give confident scores.
        chunk_size: rows per chunk.

    Returns:
        ``[n, C]`` float32 numpy array; every row sums to 1.

    Raises:
        ValueError: an input is not 2-D, ``temperature <= 0`` or ``chunk_size < 1``.
        HLSSError: the image and class embeddings have different widths (e.g. the class prompts
            were embedded with a different text encoder than the model was trained with).
    """
    if not temperature > 0:
        raise ValueError(f"zero_shot_scores: temperature must be > 0, got {temperature}")
    if int(chunk_size) < 1:
        raise ValueError(f"zero_shot_scores: chunk_size must be >= 1, got {chunk_size}")
    n, d = check_2d(text_space, "zero_shot_scores text_space")
    c, d_text = check_2d(class_text, "zero_shot_scores class_text")
    if d != d_text:
        raise HLSSError(
            f"zero-shot: image embeddings have width {d} but class text embeddings "
            f"{d_text}; embed the prompts with the text encoder the model was trained with"
        )
    protos = F.normalize(rows_f32(class_text), dim=-1)
    out = np.empty((n, c), dtype=np.float32)
    step = int(chunk_size)
    with torch.no_grad(), Progress(n, "zero-shot", "patches") as progress:
        for start in range(0, n, step):
            chunk = F.normalize(rows_f32(text_space, start, start + step), dim=-1)
            logits = chunk @ protos.T / float(temperature)
            out[start : start + step] = torch.softmax(logits, dim=-1).numpy()
            progress.update(len(chunk))
    return out
