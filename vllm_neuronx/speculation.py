"""vLLM's speculative_config -> fused speculation as NxDI compiles it (pure functions).

Fused speculation runs the draft and the target in one device call: the call takes a
normal decode's inputs (each row's last token and its position), the draft proposes, the
target verifies every proposal in one pass, and the call returns each row's accepted
tokens, 1 to k of them.

The two counts differ by one. vLLM's ``num_speculative_tokens`` = n counts the proposals
a step verifies; NxDI's ``speculation_length`` = k counts the tokens a fused step can
yield: k - 1 proposals plus the target's own token after the last accepted one. So
k = n + 1 (both earlier plugins passed n as k, and verified one proposal fewer than asked).

A fused step writes the target's KV at positions p .. p+k-1 whatever it accepts, so a KV
line holds ``max_model_len + k`` positions: NxDI's ``seq_len`` is max_model_len + k, and
vLLM's scheduler stops each request at max_model_len as always.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

# vLLM's methods that NxDI fuses, and the neuron-config keys each sets.
METHODS = ("draft_model", "eagle", "eagle3")
# vLLM's methods that NxDI does not run (its Medusa is a different model class).
REFUSED_METHODS = ("ngram", "medusa", "mlp_speculator", "mtp", "suffix")
# The neuron-config keys speculation sets (refused as overrides without speculative_config).
KEYS = ("speculation_length", "enable_fused_speculation", "enable_eagle_speculation",
        "is_eagle3")

# SpeculativeConfig options the fused graph does not honour -> the value that means "off".
_UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "disable_by_batch_size": None,  # the graph always speculates
    "parallel_drafting": False,
    "quantization": None,  # the draft takes the target's neuron config (its quantization)
    "max_model_len": None,  # the draft's KV lines are the target's
    "speculative_token_tree": None,  # checked apart: vLLM fills in a chain
}


class SpeculationError(ValueError):
    """A speculative_config the fused graph cannot run; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Draft:
    """What proposes the tokens: a draft model or an EAGLE head, in a local folder."""

    method: str  # one of METHODS
    path: str
    num_speculative_tokens: int  # vLLM's n: proposals per step

    @property
    def speculation_length(self) -> int:
        """NxDI's k: the most tokens one fused step yields (n proposals + 1)."""
        return self.num_speculative_tokens + 1

    @property
    def is_eagle(self) -> bool:
        return self.method in ("eagle", "eagle3")


def _chain(n: int) -> str:
    """vLLM's own token tree for a chain of n proposals (what it fills in when unset)."""
    return str([(i + 1) * (0,) for i in range(n)])


def from_vllm(spec_config, *, resolve_folder=None) -> Draft | None:
    """vLLM's SpeculativeConfig (or None) -> the Draft, or a SpeculationError naming
    what the fused graph cannot do. ``resolve_folder(model, revision)`` turns a hub id
    into a local folder (never downloads)."""
    if spec_config is None:
        return None
    method = spec_config.method
    if method in REFUSED_METHODS or method not in METHODS:
        raise SpeculationError(
            f"speculative_config method {method!r} is not served on Neuron: NxDI fuses a "
            f"draft model or an EAGLE head into the target ({', '.join(METHODS)})")
    n = spec_config.num_speculative_tokens
    for option, off in _UNSUPPORTED_OPTIONS.items():
        value = getattr(spec_config, option, off)
        if option == "speculative_token_tree":
            if value not in (None, _chain(n)):
                raise SpeculationError(
                    "speculative_config speculative_token_tree is not served on Neuron: the "
                    "fused graph verifies one chain of proposals")
            continue
        if value not in (off, None):
            raise SpeculationError(
                f"speculative_config {option}={value!r} is not served on Neuron: the fused "
                "graph runs the draft with the target's settings and speculates every step")
    model = spec_config.model
    if not model:
        raise SpeculationError("speculative_config needs model: the draft model's or the "
                               "EAGLE head's folder")
    if resolve_folder is not None:
        path = resolve_folder(model, getattr(spec_config, "revision", None))
    else:
        path = model
    if not os.path.isdir(path):
        raise SpeculationError(f"speculative_config model {model!r} is not a local folder")
    draft = Draft(method=method, path=os.path.abspath(path), num_speculative_tokens=n)
    check_folder(draft)
    return draft


def check_folder(draft: Draft) -> None:
    """What every backend reads of the draft folder is there, checked when vLLM's config is
    resolved (not when the engine core compiles): a config and weights, and an EAGLE head's
    ``fc`` (its input layer), read from the safetensors headers only."""
    what = "EAGLE head" if draft.is_eagle else "draft model"
    if not os.path.isfile(os.path.join(draft.path, "config.json")):
        raise SpeculationError(f"speculative_config model {draft.path}: no config.json; the "
                               f"{what} must be a Hugging Face model folder")
    names = checkpoint_keys(draft.path)
    if names is None and not (draft.is_eagle and
                              glob.glob(os.path.join(draft.path, "pytorch_model*.bin"))):
        raise SpeculationError(f"speculative_config model {draft.path}: no *.safetensors "
                               f"weights for the {what}")
    if draft.is_eagle and names is not None:
        if "fc.weight" not in names:
            raise SpeculationError(
                f"speculative_config model {draft.path}: no fc.weight, so it is not an EAGLE "
                f"head (method {draft.method!r}); for a draft model drop the method")


def checkpoint_keys(path: str) -> set[str] | None:
    """The tensor names of a safetensors checkpoint folder, read from the headers only, with
    "model." cut (as NxDI's state-dict loader cuts it); None where it holds no safetensors."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.update(k.removeprefix("model.") for k in f.keys())  # noqa: SIM118
    return keys


def neuron_config_keys(draft: Draft) -> dict[str, Any]:
    """The neuron-config keys NxDI compiles fused speculation from."""
    keys: dict[str, Any] = {
        "speculation_length": draft.speculation_length,
        "enable_fused_speculation": True,
    }
    if draft.is_eagle:
        keys["enable_eagle_speculation"] = True
    if draft.method == "eagle3":
        keys["is_eagle3"] = True
    return keys


def speculation_length(cfg) -> int:
    """k of a neuron config (0 without fused speculation)."""
    if not cfg.get("enable_fused_speculation") and not cfg.get("enable_eagle_speculation"):
        return 0
    return int(cfg.get("speculation_length") or 0)


def apply(cfg: dict[str, Any], overrides: dict[str, Any], draft: Draft | None) -> None:
    """Put the draft's keys into the neuron config (``cfg`` is built from vLLM's settings
    and the user's ``overrides``, which may repeat the keys but not contradict them), and
    refuse the keys alone: they would compile a graph no runner drives."""
    asked = [k for k in KEYS if overrides.get(k) not in (None, False, 0)]
    if draft is None:
        if asked:
            raise SpeculationError(
                f"override_neuron_config key {asked[0]!r} asks for speculative decoding; set "
                "speculative_config instead (e.g. {\"model\": DRAFT, "
                "\"num_speculative_tokens\": 4}, or \"method\": \"eagle\"), which sets it")
        return
    keys = neuron_config_keys(draft)
    for key in KEYS:
        want, given = keys.get(key), overrides.get(key)
        if key in overrides and (given != want if want is not None else bool(given)):
            raise SpeculationError(
                f"override_neuron_config {key}={given!r} contradicts speculative_config "
                f"(method {draft.method!r}, num_speculative_tokens="
                f"{draft.num_speculative_tokens}, which means {key}={want!r}); leave it out")
    cfg.update(keys)
