"""Prompt-weight syntax (``--weighted_captions`` and ``--sample_prompts``), as sd-scripts reads it.

Syntax (A1111's emphasis, the subset sd-scripts parses):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it
  by 1.3; brackets nest and their factors multiply. A bracket left open applies to the rest of the text; a closing
  bracket without an opening one is plain text.
* ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; a backslash before anything else is
  dropped. ``BREAK`` and A1111's ``[a:b:step]`` editing are plain text (sd-scripts' training does not read them).
* A weight is ``[+-]?[.0-9]+``. Where sd-scripts would silently read a malformed weight inside an open ``(`` as
  text (``(word:abc)``, ``(word: 1.2)``) or crash (``(word:1.2.3)``), :func:`check_prompt` says so; the parsers
  used while training are lenient like sd-scripts, so a caption that ``--shuffle_caption`` reorders into a new
  malformed weight is read as text and never stops a run.

Two layouts of the per-token weights, each matching one sd-scripts code path:

* training (:func:`tokenize_with_weights`): ``BOS + tokens + EOS + PAD…`` of the ``tokenize`` length; the
  text encoder's hidden states are multiplied by the weights, nothing else (sd-scripts' ``strategy_sd`` /
  ``strategy_sdxl`` ``encode_tokens_with_weights``);
* sampling (:func:`long_prompt_ids_and_weights`): sd-scripts' long-prompt-weighting pipeline, up to three 77-token
  windows each with its own BOS/EOS, the weighted hidden states then rescaled so that their mean over tokens and
  channels is the unweighted mean (:func:`apply_weights_keep_mean`).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from library.errors import UserInputError

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
LONG_PROMPT_MAX_WINDOWS = 3  # the long-prompt pipeline's max_embeddings_multiples: 225 tokens

# One match per syntax element: escapes, a lone backslash, opening brackets, ":<weight>)" (anything up to the next
# bracket; checked below), closing brackets, plain text, a lone colon.
_ELEMENTS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\
    | \( | \[
    | :(?P<weight>[^\\()\[\]]*)\)
    | \) | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_NUMBER = re.compile(r"[+-]?[.\d]+")


class PromptWeightError(UserInputError):
    """A malformed weight in a caption or prompt."""


def _weight_value(text: str) -> float | None:
    """``text`` as sd-scripts reads a weight, or None when it is not one."""
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return float(text)
    except ValueError:  # '1.2.3', '.', '+.': sd-scripts' pattern accepts them, then float() fails
        return None


def parse_prompt_weights(text: str, strict: bool = False) -> list[tuple[str, float]]:
    """Split ``text`` into ``(text, weight)`` runs; neighbouring runs of equal weight are joined (sd-scripts'
    ``parse_prompt_attention``). With ``strict``, a malformed ``:weight)`` inside an open ``(`` raises
    ``ValueError`` quoting it; without, it is plain text as in sd-scripts."""
    runs: list[list[Any]] = []
    round_starts: list[int] = []
    square_starts: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ELEMENTS.finditer(text):
        element, weight_text = match.group(0), match.group("weight")
        if element.startswith("\\"):
            runs.append([element[1:], 1.0])
        elif element == "(":
            round_starts.append(len(runs))
        elif element == "[":
            square_starts.append(len(runs))
        elif weight_text is not None:
            weight = _weight_value(weight_text)
            if round_starts and weight is not None:
                multiply_from(round_starts.pop(), weight)
            elif round_starts:
                if strict:
                    raise ValueError(
                        f"malformed weight {':' + weight_text + ')'!r}: expected a number such as '(word:1.2)'; "
                        r"write a literal parenthesis as '\(' or '\)'"
                    )
                runs.append([":" + weight_text, 1.0])
                multiply_from(round_starts.pop(), ROUND_FACTOR)
            else:
                runs.append([element, 1.0])
        elif element == ")" and round_starts:
            multiply_from(round_starts.pop(), ROUND_FACTOR)
        elif element == "]" and square_starts:
            multiply_from(square_starts.pop(), SQUARE_FACTOR)
        else:
            runs.append([element, 1.0])

    for start in round_starts:
        multiply_from(start, ROUND_FACTOR)
    for start in square_starts:
        multiply_from(start, SQUARE_FACTOR)
    if not runs:
        return [("", 1.0)]

    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(run_text, weight) for run_text, weight in merged]


def check_prompt(text: str) -> None:
    """Raise ``ValueError`` quoting the first malformed weight of ``text``, if any."""
    parse_prompt_weights(text, strict=True)


def tokens_with_weights(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Token ids of ``text`` without BOS/EOS and each token's weight, cut at ``max_tokens``. Every run is tokenized
    on its own (as sd-scripts does), so a run boundary is also a token boundary."""
    ids: list[int] = []
    weights: list[float] = []
    for run_text, weight in parse_prompt_weights(text):
        run_ids = tokenizer(run_text).input_ids[1:-1]
        ids += run_ids
        weights += [weight] * len(run_ids)
        if len(ids) > max_tokens:
            break
    return ids[:max_tokens], weights[:max_tokens]


def tokenize_with_weights(
    tokenizer: Any, captions: list[str], max_token_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training layout: ids (B, L) ``BOS + tokens + EOS + PAD…`` and weights (B, L), 1.0 outside the text.

    L is ``library.text_encoding.tokenize``'s: 77, or ``max_token_length`` + 2. The ids go through the same
    75-token windows as unweighted ids; the merged hidden states (B, L, D) are multiplied by the weights.
    """
    length = tokenizer.model_max_length if max_token_length is None else max_token_length + 2
    all_ids, all_weights = [], []
    for caption in captions:
        ids, weights = tokens_with_weights(tokenizer, caption, length - 2)
        padding = length - 2 - len(ids)
        all_ids.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        all_weights.append([1.0, *weights] + [1.0] * (padding + 1))
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_weights, dtype=torch.float32)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, L, D) times per-token weights (B, L), in the hidden states' dtype."""
    return hidden * weights.to(hidden.device, hidden.dtype).unsqueeze(-1)


def long_prompt_windows(tokenizer: Any, prompts: list[str], max_windows: int = LONG_PROMPT_MAX_WINDOWS) -> int:
    """How many 75-token windows the long-prompt pipeline gives a group of prompts (a prompt and its negative):
    enough for the longest, at least 1, at most ``max_windows``."""
    inner = tokenizer.model_max_length - 2
    longest = max(len(tokens_with_weights(tokenizer, text, inner * max_windows)[0]) for text in prompts)
    return max(1, min(max_windows, (longest - 1) // inner + 1))


def long_prompt_ids_and_weights(
    tokenizer: Any, prompts: list[str], n_windows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling layout: ids (B, 75·n + 2) ``BOS + tokens + EOS + PAD…`` (for ``split_into_chunks``) and weights
    (B, 77·n): window by window ``1, the window's token weights, 1``, and 1.0 after the text."""
    inner = tokenizer.model_max_length - 2
    length = inner * n_windows + 2
    all_ids, all_weights = [], []
    for text in prompts:
        ids, weights = tokens_with_weights(tokenizer, text, length - 2)
        padding = length - 2 - len(ids)
        all_ids.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        windowed = torch.ones(n_windows, inner + 2)
        for window in range(n_windows):
            part = weights[window * inner : (window + 1) * inner]
            windowed[window, 1 : 1 + len(part)] = torch.tensor(part)
        all_weights.append(windowed.reshape(-1))
    return torch.tensor(all_ids, dtype=torch.long), torch.stack(all_weights)


def apply_weights_keep_mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The long-prompt pipeline's weighting: ``hidden`` (B, L, D) times ``weights`` (B, L), then each prompt
    rescaled by (mean before / mean after), the means over tokens and channels taken in float32. A prompt whose
    weighted mean is exactly 0 is left unscaled (sd-scripts would divide by zero)."""
    before = hidden.float().mean(dim=(-2, -1)).to(hidden.dtype)
    weighted = apply_token_weights(hidden, weights)
    after = weighted.float().mean(dim=(-2, -1)).to(hidden.dtype)
    scale = torch.where(after != 0, before / after, torch.ones_like(after))
    return weighted * scale[:, None, None]


def caption_source(image_path: str, caption_extension: str) -> str:
    """Where an image's caption came from: its caption file, or its folder's class tokens."""
    caption_file = os.path.splitext(image_path)[0] + caption_extension
    return caption_file if os.path.isfile(caption_file) else f"the class tokens of {image_path}"


def check_dataset_captions(dataset: Any) -> None:
    """Before training with ``--weighted_captions``: every caption as written (each line of a wildcard caption) and
    every subset's ``caption_prefix`` / ``caption_suffix`` must have well-formed weights; otherwise raises
    ``PromptWeightError`` quoting the text and naming its file or option."""
    for bucketed in dataset.datasets:
        for subset in bucketed.subsets:
            for option in ("caption_prefix", "caption_suffix"):
                _check(getattr(subset, option) or "", f"{option} of {subset.image_dir}")
        for item in bucketed.items:
            subset = item.subset
            for line in item.caption.split("\n"):
                _check(line, caption_source(item.path, subset.caption_extension))


def _check(text: str, source: str) -> None:
    try:
        check_prompt(text)
    except ValueError as error:
        raise PromptWeightError(f"--weighted_captions: caption {text!r} in {source}: {error}") from None
