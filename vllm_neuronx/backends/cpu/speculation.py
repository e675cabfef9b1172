"""Fused speculation on the CPU backend, as NxDI's fused graph runs it.

A decode call of a speculating backend takes each row's last token x at position p (its KV
line is its seq_id) and, with k = speculation_length (vllm_neuronx/speculation.py):

1. the proposer (a draft model, ``DraftModel``, or an EAGLE head, ``Eagle``) drafts
   d_1..d_{k-1} from KV lines of its own (the same line numbers);
2. the target verifies [x, d_1..d_{k-1}] at p..p+k-1 in ONE multi-token pass: k rows of
   the line at consecutive positions in one native step (decode_step.c stores every row's
   K/V before any row attends), or llama.py's ``decode_rows`` on the torch path; it writes
   the target's KV there and gives logits L_0..L_{k-1};
3. acceptance (``accept``): a greedy row (top_k 1) keeps d_{j+1} while it equals
   argmax L_j, then the target's own token (argmax at the first mismatch, or the bonus
   argmax L_{k-1}). A sampled row is rejection-sampled (``rejection_sample``; NxDI's
   ``_speculative_mask`` / ``_adjust_target_probs``, model_base.py 1664-1748): d_{j+1} is
   kept with probability min(1, p_j(d)/q_j(d)), else the row ends with a token drawn from
   norm(max(0, p_j - q_j)), and with the bonus drawn from p_{k-1} when every draft is kept;
   p and q are the target's and the proposer's distributions after the row's top_k, top_p
   and temperature (``sampling.probabilities``, what ``sampling.sample`` draws from), and
   each draft was drawn from q, so the row's tokens follow the target's distribution.

The call returns 1..k tokens per row (``ForwardOutput.spec_tokens``, -1 after them;
``tokens`` is column 0, ``logits`` L_0). The runner may keep fewer (the scheduler capped the
step, or the row is sampled on the host from L_0): the target's KV entries past what it
keeps are overwritten by later steps, and what a proposer keeps for a line is used only
where the next step's position shows the runner kept it, so the proposer's cache holds the
kept tokens whatever the runner keeps.

Draft model: NxDI runs the draft k times, the k-th only to write d_{k-1}'s KV
(model_base.py ``_token_gen_forward``, 1812-1929: "k iterations of the draft model. We use
only first k-1 tokens. Extra run is for populating the kv cache"). Here that write is
deferred: d_{k-1} at p+k-1 is remembered, and only when the next step's position is p+k
(the runner kept all k tokens, so d_{k-1} was accepted) written by an extra row of that
step's first draft call (rows d_{k-1} at p+k-1 and x' at p+k of one line, one native call:
a second row costs little where a step reads its weights once). The draft's cache holds the
same kept tokens as NxDI's, for k - 1 draft calls a step instead of k.

EAGLE (eagle.py has the heads and the references): the head's row at position j takes the
token at j + 1 with the target's feature of position j (EAGLE-1: the target's last hidden
state after its final norm; EAGLE3: the residual streams entering three target layers), and
writes the head's KV at j. NxDI (model_base.py 2517-2700) drafts from (x, f_{p-1}) at p - 1,
then (d_j, head hidden) at p + j - 1, verifies, and reruns the head over all k candidates
with the target's features f_{p-1}..f_{p+k-2} at p-1..p+k-2 to rewrite the head's KV. Here
that rerun is folded into the next step's first head call: after the verify the line keeps
(start p, the step's tokens t_1..t_c, the target's features f_p..f_{p+k-1}); the next step,
input x' at p', runs the catch-up rows (t_1, f_p) .. (t_{n-1}, f_{p+n-2}), (x', f_{p'-1}) at
p..p'-1 (n = p' - p <= c rows: what the runner kept, the last one's token the step's input
whatever sampled it) in one call whose last row per line proposes d_1; then (d_j, hidden)
at p'+j-1 -> d_{j+1}. The head's KV at the kept positions is made from the target's
features as in NxDI and vLLM (``vllm/v1/spec_decode/eagle.py``: the first pass re-runs the
accepted tokens with the target's hidden states), with k - 1 head calls a step instead of
k. At prefill the head takes (t_{j+1}, f_j) at j = 0..L-2 and keeps (start L-1, f_{L-1}).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from vllm_neuronx import neuron_config as nc
from vllm_neuronx import sampling
from vllm_neuronx.backends.cpu.llama import Capture, LlamaModel, LlamaSpec, rms_norm
from vllm_neuronx.backends.protocol import Batch, ForwardOutput
from vllm_neuronx.speculation import Draft

if TYPE_CHECKING:
    from vllm_neuronx.backends.cpu.backend import CpuBackend
    from vllm_neuronx.backends.cpu.eagle import EagleHead
    from vllm_neuronx.backends.cpu.lora import LoraStep
    from vllm_neuronx.backends.cpu.native import NativeStep

# The draft model's weights, beside the target's in the artifacts (backend.WEIGHTS_FILE).
DRAFT_FILE = "draft.safetensors"
PAD = -1  # spec_tokens after a row's accepted tokens (NxDI's at HEAD)


# -- the draft model's checks and conversion --------------------------------------------
def check_draft(draft: Draft, target: LlamaSpec) -> LlamaSpec | None:
    """The draft model's shape, or a NeuronConfigError naming what the CPU backend cannot
    run: an architecture it does not serve, or a vocabulary other than the target's (the
    verify pass compares token ids). None for an EAGLE head (eagle.py checks it at load)."""
    if draft.is_eagle:
        return None
    try:
        spec = LlamaSpec.from_folder(draft.path)
    except (OSError, KeyError, ValueError) as e:
        raise nc.NeuronConfigError(
            f"speculative_config model {draft.path}: the CPU backend cannot run it as a "
            f"draft model: {e}") from None
    if spec.vocab_size != target.vocab_size:
        raise nc.NeuronConfigError(
            f"speculative_config model {draft.path}: vocab_size {spec.vocab_size} differs "
            f"from the target's {target.vocab_size}; a draft model must share the target's "
            "vocabulary")
    return spec


def compile_draft(backend: CpuBackend, folder: str) -> None:
    """The draft model's checkpoint converted (and quantized) as NxDI's fused draft is:
    the target's neuron config, with draft_model_modules_to_not_convert as its list of
    modules left in float (``QuantConfig.for_draft``), into ``DRAFT_FILE``."""
    spec = check_draft(backend.draft, backend.spec)
    backend.convert(backend.draft.path, spec, os.path.join(folder, DRAFT_FILE),
                    backend.draft_quant)


# -- acceptance ------------------------------------------------------------------------
class Sampler:
    """One step's rows' sampling: greedy rows (top_k 1) by argmax, the others drawn from
    ``sampling.probabilities`` with the backend's generator."""

    __slots__ = ("params", "global_topk", "generator", "sampled")

    def __init__(self, params: torch.Tensor, global_topk: int,
                 generator: torch.Generator | None) -> None:
        self.params = params
        self.global_topk = global_topk
        self.generator = generator
        # The sampled rows (None: every row is greedy, the common case, no extra work).
        sampled = (params[:, 0] != 1).nonzero().flatten()
        self.sampled = sampled if sampled.numel() else None

    def propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A proposer's logits [m, V] -> its tokens [m] and, for the sampled rows, the
        distributions they were drawn from, dense [s, V] (None without sampled rows)."""
        tokens = sampling.argmax(logits)
        rows = self.sampled
        if rows is None:
            return tokens, None
        probs, ids = sampling.probabilities(logits[rows], self.params[rows], self.global_topk)
        pick = torch.multinomial(probs, 1, generator=self.generator)
        tokens[rows] = ids.gather(-1, pick).squeeze(-1)
        q = torch.zeros((rows.numel(), logits.shape[-1]), dtype=probs.dtype)
        return tokens, q.scatter_(1, ids, probs)


def greedy_accept(logits: torch.Tensor, drafts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits [m, k, V] and drafts [m, k-1] -> (tokens [m, k]: the drafts that
    equal the target's argmax, then the target's own token, then PAD; counts [m])."""
    best = sampling.argmax(logits.flatten(0, 1)).view(logits.shape[:2])
    agreed = (drafts == best[:, :-1]).int().cumprod(dim=-1).sum(dim=-1)
    keep = torch.arange(best.shape[1]) <= agreed[:, None]
    return torch.where(keep, best, PAD), agreed + 1


def rejection_sample(p: torch.Tensor, p_ids: torch.Tensor, q: torch.Tensor,
                     drafts: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of s rows at once.

    ``p`` [s, k, K]: the target's probabilities over its candidates ``p_ids`` [s, k, K] at
    each of the k verified positions (zeros allowed; each row sums to 1); ``q`` [s, k-1, V]:
    the dense distributions the drafts [s, k-1] were drawn from. d_{j+1} is kept with
    probability min(1, p_j(d)/q_j(d)); the first rejected position j takes a token drawn
    from norm(max(0, p_j - q_j)) (over p's candidates: off them p is 0), and a row whose
    every draft is kept ends with one drawn from p_{k-1}. Returns (tokens [s, k], PAD after
    each row's, counts [s])."""
    s, k, _ = p.shape
    p_draft = ((p_ids[:, :-1] == drafts[..., None]) * p[:, :-1]).sum(dim=-1)  # [s, k-1]
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand((s, k - 1), generator=generator)
    kept = (u * q_draft < p_draft).int().cumprod(dim=-1).sum(dim=-1)  # u < p/q, q > 0
    residual = (p[:, :-1] - q.gather(-1, p_ids[:, :-1])).clamp_min(0.0)
    # p == q exactly: nothing to resample from, and no draft is ever rejected there.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :-1])
    fix = torch.cat([residual, p[:, -1:]], dim=1).reshape(s * k, -1)
    pick = torch.multinomial(fix, 1, generator=generator).view(s, k, 1)
    fixed = p_ids.gather(-1, pick).squeeze(-1)  # [s, k]: each position's replacement
    at = torch.arange(k)[None, :]
    drafted = torch.cat([drafts, torch.full((s, 1), PAD, dtype=drafts.dtype)], dim=1)
    tokens = torch.where(at < kept[:, None], drafted,
                         torch.where(at == kept[:, None], fixed, PAD))
    return tokens, kept + 1


def accept(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None,
           sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's accepted tokens [m, k] (PAD after them) and their counts [m]: greedy rows
    by exact match, sampled rows (``sampler.sampled``, whose draft distributions ``q``
    [s, k-1, V] are) by ``rejection_sample``."""
    tokens, counts = greedy_accept(logits, drafts)
    rows = sampler.sampled
    if rows is None:
        return tokens, counts
    s, (_, k, vocab) = rows.numel(), logits.shape
    p, p_ids = sampling.probabilities(logits[rows].reshape(s * k, vocab),
                                      sampler.params[rows].repeat_interleave(k, dim=0),
                                      sampler.global_topk)
    tokens[rows], counts[rows] = rejection_sample(p.view(s, k, -1), p_ids.view(s, k, -1), q,
                                                  drafts[rows], sampler.generator)
    return tokens, counts


# -- proposers ---------------------------------------------------------------------------
class DraftModel:
    """A draft model (a Llama-family model of the target's vocabulary) with KV lines of its
    own, its steps native where its native step runs (one row per line, m rows a call).

    ``shared``: the draft is the target's own checkpoint (quantized apart, QuantConfig.
    for_draft), and reads and writes the target's KV lines instead of its own. Its K/V of
    the prompt and of every kept token would be the target's but for rounding, so it takes
    the target's: no prefill of its own (half of a speculating prefill otherwise), no
    deferred write (the verify pass wrote p..p+k-1), no second cache. Its writes at the
    positions it drafts are overwritten by the verify pass before any kept token reads them.
    Only the proposals change (from the exact K/V), never the tokens."""

    def __init__(self, model: LlamaModel, native: NativeStep | None, num_lines: int,
                 shared: bool = False) -> None:
        self.model = model
        self.native = native
        self.shared = shared
        # The deferred KV write (module docstring): the last draft's position and token,
        # per line (-1: none).
        self.deferred = torch.full((num_lines,), -1, dtype=torch.long)
        self.deferred_token = torch.zeros(num_lines, dtype=torch.long)

    def capture(self) -> Capture | None:
        return None  # a draft model reads tokens only

    def prefill(self, padded: torch.Tensor, lengths: torch.Tensor, lines: torch.Tensor,
                capture: Capture | None) -> None:
        """The prompts into the draft's lines (no logits: the target gave the token)."""
        self.deferred[lines] = -1
        if self.shared:  # the target's prefill filled the lines
            return
        done = None
        if self.native is not None:
            done = self.native.prefill(padded, lengths, lines, logits=False)
        if done is None:
            self.model.context_encode(padded, lengths, lines)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, lines: torch.Tensor
              ) -> torch.Tensor:
        logits = None
        if self.native is not None:
            logits = self.native.decode(ids, positions, lines)
        if logits is None:
            logits = self.model.token_generate(ids, positions, lines, self.model.max_len)
        return logits

    def propose(self, x: torch.Tensor, p: torch.Tensor, lines: torch.Tensor, count: int,
                sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``count`` drafts per row [m, count] from x at p, and for the sampled rows the
        distributions they were drawn from [s, count, V] (None without)."""
        late = (self.deferred[lines] == p - 1).nonzero().flatten()
        if not late.numel():
            logits = self._step(x, p, lines)
        elif self.native is not None:  # the deferred rows first, then the inputs
            n = late.numel()
            logits = self.native.rows(
                torch.cat([self.deferred_token[lines[late]], x]),
                torch.cat([p[late] - 1, p]), torch.cat([lines[late], lines]),
                out_rows=torch.arange(n, n + x.shape[0]))[0]
        else:
            self.model.decode_rows(self.deferred_token[lines[late]][:, None],
                                   (p[late] - 1)[:, None], lines[late], self.model.max_len)
            logits = self._step(x, p, lines)
        token, q = sampler.propose(logits)
        drafts, qs = [token], [q]
        for j in range(1, count):
            token, q = sampler.propose(self._step(token, p + j, lines))
            drafts.append(token)
            qs.append(q)
        if not self.shared:
            self.deferred[lines] = p + count
            self.deferred_token[lines] = token
        return torch.stack(drafts, dim=1), None if q is None else torch.stack(qs, dim=1)

    def verified(self, p, lines, tokens, counts, capture) -> None:
        """Nothing to keep: the next step's position decides the deferred write."""


class Eagle:
    """An EAGLE-1 or EAGLE3 head (eagle.py) fed with the target's features, kept per line
    between steps (module docstring)."""

    def __init__(self, head: EagleHead, target: LlamaModel, num_lines: int, k: int) -> None:
        self.head = head
        self.target = target
        # EAGLE3 reads the streams entering these target layers; EAGLE-1 (and an EAGLE3
        # head without aux states) the last hidden state after the final norm.
        self.aux_layers = tuple(head.aux_layer_ids or ())
        width = head.feature_size
        self.start = torch.full((num_lines,), -1, dtype=torch.long)  # first pending position
        self.count = torch.zeros(num_lines, dtype=torch.long)  # pending rows the runner may keep
        self.tokens = torch.zeros((num_lines, k), dtype=torch.long)  # at start+1, start+2...
        self.features = torch.zeros((num_lines, k, width), dtype=head.dtype)  # at start...

    def capture(self) -> Capture:
        return Capture(aux_layers=self.aux_layers)

    def features_of(self, capture: Capture) -> torch.Tensor:
        """The target's features [..., F] from a step's capture."""
        if self.aux_layers:
            return capture.aux
        return rms_norm(capture.hidden, self.target.w["norm"], self.target.spec.rms_norm_eps)

    def prefill(self, padded: torch.Tensor, lengths: torch.Tensor, lines: torch.Tensor,
                capture: Capture) -> None:
        """(t_{j+1}, f_j) at j = 0..L-2 into the head's lines; f_{L-1} kept for the first
        decode step (its token is that step's input)."""
        features = self.features_of(capture).to(self.head.dtype)
        n, width = padded.shape
        at = torch.arange(width - 1)
        real = at[None, :] < (lengths - 1)[:, None]
        if bool(real.any()):
            self.head.forward(padded[:, 1:][real], features[:, :-1][real],
                              at.expand(n, width - 1)[real],
                              lines[:, None].expand(n, width - 1)[real], logits=False)
        last = lengths - 1
        self.start[lines] = last
        self.count[lines] = 1
        self.features[lines, 0] = features[torch.arange(n), last]

    def propose(self, x: torch.Tensor, p: torch.Tensor, lines: torch.Tensor, count: int,
                sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = x.shape[0]
        n = p - self.start[lines]  # catch-up rows per line: positions start..p-1
        if bool(((n < 1) | (n > self.count[lines])).any()):
            raise RuntimeError(
                f"EAGLE: KV lines {lines.tolist()} at positions {p.tolist()} do not follow "
                "their last step (a decode of a line its prefill did not fill, or past the "
                "tokens the last step returned)")
        width = int(n.max())
        at = torch.arange(width)
        real = at[None, :] < n[:, None]
        tokens = self.tokens[lines, :width].clone()
        tokens[torch.arange(m), n - 1] = x  # the step's input, whoever sampled it
        logits, hidden = self.head.forward(
            tokens[real], self.features[lines, :width][real],
            (self.start[lines][:, None] + at)[real], lines[:, None].expand(m, width)[real])
        last = n.cumsum(0) - 1  # each line's last row: (x, f_{p-1}) at p - 1
        token, q = sampler.propose(logits[last])
        hidden = hidden[last]
        drafts, qs = [token], [q]
        for j in range(1, count):
            logits, hidden = self.head.forward(token, hidden, p + j - 1, lines)
            token, q = sampler.propose(logits)
            drafts.append(token)
            qs.append(q)
        return torch.stack(drafts, dim=1), None if q is None else torch.stack(qs, dim=1)

    def verified(self, p: torch.Tensor, lines: torch.Tensor, tokens: torch.Tensor,
                 counts: torch.Tensor, capture: Capture) -> None:
        """Keep the step's tokens and the target's features f_p..f_{p+k-1}."""
        self.start[lines] = p
        self.count[lines] = counts
        self.tokens[lines] = tokens
        self.features[lines] = self.features_of(capture).to(self.head.dtype)


# -- the fused step ----------------------------------------------------------------------
class FusedSpeculation:
    """A speculating backend's proposer, its prefill and its fused decode step."""

    def __init__(self, target: LlamaModel, native: NativeStep | None,
                 proposer: DraftModel | Eagle, k: int, global_topk: int,
                 generator: torch.Generator) -> None:
        if k < 2:
            raise ValueError(f"speculation_length {k}: fused speculation needs k >= 2")
        self.target = target
        self.native = native
        self.proposer = proposer
        self.k = k
        self.global_topk = global_topk
        self.generator = generator

    @classmethod
    def load(cls, backend: CpuBackend, folder: str) -> FusedSpeculation:
        """The backend's proposer (its target model loaded): the draft model from
        ``DRAFT_FILE``, or the EAGLE head from its folder."""
        draft, k = backend.draft, backend.speculation_length
        lines, max_len = backend.num_lines, backend.max_length
        if draft.is_eagle:
            from vllm_neuronx.backends.cpu.eagle import EagleHead

            head = EagleHead.from_folder(
                draft.path, backend.spec, num_lines=lines, max_len=max_len,
                dtype=backend.dtype, target_weights=backend.model.w,
                target_linear=backend.model.linear, method=draft.method)
            proposer: DraftModel | Eagle = Eagle(head, backend.model, lines, k)
        else:
            spec = check_draft(draft, backend.spec)
            shared = os.path.realpath(draft.path) == os.path.realpath(backend.model_path)
            kv = (backend.model.k_cache, backend.model.v_cache) if shared else None
            model, native = backend.build_model(os.path.join(folder, DRAFT_FILE), spec,
                                                backend.matmul, kv=kv)
            proposer = DraftModel(model, native, lines, shared)
        topk = backend.global_topk
        if topk is None:
            raise nc.NeuronConfigError("fused speculation needs on_device_sampling_config")
        return cls(backend.model, backend.native, proposer, k, topk, backend.generator)

    def prefill_capture(self) -> Capture | None:
        """What the target's prefill must hand the proposer (None: nothing)."""
        return self.proposer.capture()

    def prefill(self, padded: torch.Tensor, lengths: torch.Tensor, lines: torch.Tensor,
                capture: Capture | None) -> None:
        self.proposer.prefill(padded, lengths, lines, capture)

    def verify(self, ids: torch.Tensor, p: torch.Tensor, lines: torch.Tensor,
               lora: LoraStep | None, capture: Capture | None) -> torch.Tensor:
        """The target over ids [m, k] at p..p+k-1 of each row's line, in one pass: logits
        [m, k, V] (``capture`` gets the hidden states, [m, k, ...])."""
        m, k = ids.shape
        positions = p[:, None] + torch.arange(k)
        if self.native is not None and (lora is None or lora.slots is not None):
            slots = None if lora is None else lora.slots.repeat_interleave(k)
            logits, hidden, aux = self.native.rows(
                ids.flatten(), positions.flatten(), lines.repeat_interleave(k), None, slots,
                capture.aux_layers if capture is not None else ())
            if capture is not None:
                capture.hidden = hidden.view(m, k, -1)
                capture.aux = None if aux is None else aux.view(m, k, -1)
            return logits.view(m, k, -1)
        x = self.target.decode_rows(ids, positions, lines, self.target.max_len, lora, capture)
        return self.target.logits(x)

    def decode(self, batch: Batch, lora: LoraStep | None) -> ForwardOutput:
        """The fused step (module docstring) of a checked decode batch."""
        x, p, lines = batch.input_ids[:, 0], batch.position_ids[:, 0], batch.seq_ids
        sampler = Sampler(batch.sampling_params, self.global_topk, self.generator)
        drafts, q = self.proposer.propose(x, p, lines, self.k - 1, sampler)
        capture = self.proposer.capture()
        logits = self.verify(torch.cat([x[:, None], drafts], dim=1), p, lines, lora, capture)
        tokens, counts = accept(logits, drafts, q, sampler)
        self.proposer.verified(p, lines, tokens, counts, capture)
        return ForwardOutput(tokens=tokens[:, 0].clone(), logits=logits[:, 0].contiguous(),
                             spec_tokens=tokens)
