"""Sampling on the host: upstream vLLM's V1 sampler over the logits the backend returns.

Requests that need more than temperature/top_k/top_p (``sampling.host_parameters``:
logprobs, penalties, seeds, min_p, logit_bias, allowed_token_ids, bad_words,
min_tokens, structured output) are sampled here; the others stay on the device.
Nothing is reimplemented: upstream's ``InputBatch`` turns the requests of one
step into ``SamplingMetadata`` (with its logits processors: min_p, logit_bias,
min_tokens and any ``--logits-processors``), xgrammar applies the scheduler's
structured-output bitmasks (``_apply_bitmasks``), and upstream's ``Sampler`` samples and
gathers the logprobs. As upstream's GPU runner does, the batch holds exactly the requests
sampled in this step (requests not in the step leave it and come back later with
their state), so a seeded request draws from its own generator once per token,
whatever else runs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.sampling_params import SamplingParams, SamplingType
from vllm.v1.outputs import LogprobsLists, LogprobsTensors
from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, build_logitsprocs
from vllm.v1.sample.sampler import Sampler
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_neuronx import sampling

_CPU = torch.device("cpu")


class _HostTorchSampler(Sampler):
    """Upstream's sampler with plain PyTorch ops: our platform reports itself as a CPU
    platform, for which upstream would call vllm._C kernels that a pure-Python vLLM
    does not have (greedy_argmax, fused_gumbel_argmax)."""

    def __init__(self, logprobs_mode) -> None:
        super().__init__(logprobs_mode=logprobs_mode)
        self.topk_topp_sampler.forward = self.topk_topp_sampler.forward_native

    @staticmethod
    def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1).view(-1)


@dataclass(slots=True)
class HostStep:
    """What the host sampler produced for the rows it was given, in their order."""

    tokens: list[int]
    logprobs: LogprobsTensors | None  # one row per given row, or None


class HostSampler:
    def __init__(self, vllm_config, *, vocab_size: int, max_num_reqs: int, max_len: int) -> None:
        model_config = vllm_config.model_config
        custom = tuple(model_config.logits_processors or ())
        logitsprocs = build_logitsprocs(vllm_config, _CPU, False, False, custom)
        #: with custom logits processors every request needs the host path
        self.custom_logitsprocs = sum(1 for _ in logitsprocs.all) > len(BUILTIN_LOGITS_PROCESSORS)
        self.vocab_size = vocab_size
        self.logprobs_mode = model_config.logprobs_mode
        self.batch = InputBatch(
            max_num_reqs=max_num_reqs,
            max_model_len=max_len,
            max_num_batched_tokens=max_len * max_num_reqs,
            device=_CPU,
            pin_memory=False,
            vocab_size=vocab_size,
            block_sizes=[max_len],
            kernel_block_sizes=[max_len],
            max_num_blocks_per_req=[1],
            logitsprocs=logitsprocs,
            logitsprocs_need_output_token_ids=self.custom_logitsprocs,
        )
        self.sampler = _HostTorchSampler(self.logprobs_mode)
        self.requests: dict[str, CachedRequestState] = {}

    # -- requests -------------------------------------------------------------------
    def needs_host(self, params: SamplingParams) -> bool:
        return self.custom_logitsprocs or bool(sampling.host_parameters(params))

    def admit(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        generator = None
        if params.sampling_type == SamplingType.RANDOM_SEED:
            generator = torch.Generator(device=_CPU).manual_seed(params.seed)
        self.requests[req_id] = CachedRequestState(
            req_id=req_id,
            prompt_token_ids=list(prompt_token_ids),
            mm_features=[],
            sampling_params=params,
            generator=generator,
            block_ids=([],),
            num_computed_tokens=0,
            output_token_ids=[],
        )

    def forget(self, req_id: str) -> None:
        if self.requests.pop(req_id, None) is not None:
            self.batch.remove_request(req_id)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.requests

    def wants_prompt_logprobs(self, req_id: str) -> bool:
        state = self.requests.get(req_id)
        return state is not None and state.sampling_params.prompt_logprobs is not None

    # -- one step -------------------------------------------------------------------
    def _hold_exactly(self, req_ids: list[str]) -> None:
        """The persistent batch holds this step's requests and no others."""
        wanted = set(req_ids)
        for req_id in list(self.batch.req_id_to_index):
            if req_id not in wanted:
                self.batch.remove_request(req_id)
        for req_id in req_ids:
            if req_id not in self.batch.req_id_to_index:
                self.batch.add_request(self.requests[req_id])
        self.batch.condense()
        self.batch.refresh_metadata()

    def sample(self, req_ids: list[str], logits: torch.Tensor, grammar_output=None) -> HostStep:
        """Sample one token for each of ``req_ids`` from its row of ``logits`` [n, vocab];
        ``grammar_output`` (upstream's structured-output bitmasks) constrains its requests."""
        self._hold_exactly(req_ids)
        batch = self.batch
        row_of = {req_id: i for i, req_id in enumerate(req_ids)}
        order = torch.tensor([row_of[r] for r in batch.req_ids], dtype=torch.long)
        # In the batch's order, and a copy: the sampler works in place.
        batch_logits = logits.index_select(0, order).to(torch.float32)
        if grammar_output is not None and grammar_output.structured_output_request_ids:
            _apply_bitmasks(grammar_output, batch.req_ids, batch_logits)
        out = self.sampler(batch_logits, batch.sampling_metadata)
        sampled = out.sampled_token_ids[:, 0].tolist()
        for index, (req_id, token) in enumerate(zip(batch.req_ids, sampled, strict=True)):
            end = int(batch.num_tokens_no_spec[index])
            batch.token_ids_cpu[index, end] = token
            batch.num_tokens_no_spec[index] = end + 1
            self.requests[req_id].output_token_ids.append(token)
        back = torch.argsort(order)  # batch order -> the caller's order
        tokens = [sampled[i] for i in back.tolist()]
        logprobs = out.logprobs_tensors
        if logprobs is not None:
            logprobs = LogprobsTensors(
                logprobs.logprob_token_ids.index_select(0, back),
                logprobs.logprobs.index_select(0, back),
                logprobs.selected_token_ranks.index_select(0, back),
            )
        return HostStep(tokens, logprobs)

    def prompt_logprobs(self, req_id: str, logits: torch.Tensor) -> LogprobsTensors:
        """Logprobs of prompt tokens 1..L-1 from the logits of positions 0..L-2 ([L, vocab]),
        each row the actual token first, then the top ``prompt_logprobs``."""
        state = self.requests[req_id]
        wanted = state.sampling_params.prompt_logprobs
        k = self.vocab_size if wanted == -1 else wanted
        prompt = state.prompt_token_ids
        if len(prompt) < 2:
            return LogprobsTensors.empty_cpu(0, k + 1)
        logits = logits[: len(prompt) - 1].to(torch.float32)
        if self.logprobs_mode in ("raw_logits", "processed_logits"):
            scores = logits
        else:
            scores = self.sampler.compute_logprobs(logits)
        targets = torch.tensor(prompt[1:], dtype=torch.int64)
        token_ids, logprobs, ranks = self.sampler.gather_logprobs(scores, k, targets)[:3]
        return LogprobsTensors(token_ids, logprobs, ranks)


def merge_logprobs(num_rows: int, rows: list[int], host: LogprobsTensors | None):
    """LogprobsLists for all ``num_rows`` rows of a step from the host rows' logprobs
    (rows sampled on the device asked for none; theirs are zero and never read)."""
    if host is None:
        return None
    width = host.logprobs.shape[1]
    token_ids = np.zeros((num_rows, width), dtype=np.int32)
    logprobs = np.zeros((num_rows, width), dtype=np.float32)
    ranks = np.zeros(num_rows, dtype=np.int64)
    token_ids[rows] = host.logprob_token_ids.numpy()
    logprobs[rows] = host.logprobs.numpy()
    ranks[rows] = host.selected_token_ranks.numpy()
    return LogprobsLists(token_ids, logprobs, ranks)


def _apply_bitmasks(grammar_output, req_ids: list[str], logits: torch.Tensor) -> None:
    """Mask each structured-output row of ``logits`` (rows in ``req_ids`` order) with its
    grammar's bitmask, in place. The scheduler's bitmasks come in its own order, and may
    name requests that are not in this step (sampled on the device, or finished). Rows
    without a grammar get an all-allowed mask, so xgrammar takes one full batch: upstream's
    ``apply_grammar_bitmask`` passes the rows' indices in pinned memory instead, which a
    CPU-only torch cannot allocate."""
    import xgrammar

    row_of = {req_id: i for i, req_id in enumerate(req_ids)}
    rows, masks = [], []
    for k, req_id in enumerate(grammar_output.structured_output_request_ids):
        if req_id in row_of:
            rows.append(row_of[req_id])
            masks.append(k)
    if not rows:
        return
    given = torch.from_numpy(np.asarray(grammar_output.grammar_bitmask)[masks])
    bitmask = torch.full((logits.shape[0], given.shape[1]), -1, dtype=given.dtype)
    bitmask[rows] = given
    xgrammar.apply_token_bitmask_inplace(logits, bitmask)

