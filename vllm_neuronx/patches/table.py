"""Every change vllm-neuronx makes to upstream vLLM objects, declared in one table.

Each row: the upstream target, what upstream does there, why we change it, and when
the patch can go. ``patches.apply_all`` applies the rows with a ``wrap`` as their
modules are imported; the others are applied by the module named in ``why`` and
only checked. tests/test_patch_table.py resolves every target against the installed
vLLM; README.md lists them. Our ASGI middleware (``json_body``, ``drain``'s) changes no
upstream object: it comes through upstream's own ``--middleware``, which engine-args
gives as the flag's default.
"""

from __future__ import annotations

from vllm_neuronx.patches import (
    Patch,
    best_of,
    clean_exit,
    detokenize_ids,
    drain,
    engine_args,
    engine_death,
    error_status,
    lora_check,
    null_max_tokens,
    queue_bound,
    startup_signal,
)

API_SERVER = "vllm.entrypoints.openai.api_server"
CLI_SERVE = "vllm.entrypoints.cli.serve"  # imported run_server_worker by name
COMPLETION_SERVING = "vllm.entrypoints.openai.completion.serving"
CHAT_SERVING = "vllm.entrypoints.openai.chat_completion.serving"
ASYNC_LLM = "vllm.v1.engine.async_llm"
ENGINE_ARGS = "vllm.engine.arg_utils"
# The completion and chat request handlers: (module, attribute).
HANDLERS = ((COMPLETION_SERVING, "OpenAIServingCompletion.create_completion"),
            (CHAT_SERVING, "OpenAIServingChat.create_chat_completion"))
NEURON_ARGS_UNTIL = "never: the Neuron user guide's arguments are ours, not upstream's"

PATCHES: tuple[Patch, ...] = (
    *(Patch("engine-args", ENGINE_ARGS, f"{cls}.__init__",
            upstream="takes no device= (gone since V1) and no override_neuron_config",
            why="the Neuron user guide's LLM(device='neuron', override_neuron_config={...}); "
                "tensor_parallel_size becomes NxDI's tp_degree, vLLM's world stays 1; a "
                "speculative_config naming a draft model without a method gets "
                "method='draft_model' (0.16 raises NotImplementedError for it)",
            until=NEURON_ARGS_UNTIL, wrap=engine_args.init_args,
            params=("additional_config", "tensor_parallel_size", "max_num_seqs"),
            absent=("device", "override_neuron_config"))
      for cls in ("EngineArgs", "AsyncEngineArgs")),
    Patch("engine-args", ENGINE_ARGS, "EngineArgs.add_cli_args",
          upstream="builds the engine's CLI flags",
          why="adds --device and --override-neuron-config (the user guide's serve command), "
              "the server's --max-num-queued-reqs and --shutdown-timeout, and our "
              "middleware (json_body, drain) as --middleware's default; patches __main__ "
              "when it is the API server run with python -m",
          until=NEURON_ARGS_UNTIL, wrap=engine_args.cli_args, params=("parser",)),
    Patch("engine-args", ENGINE_ARGS, "EngineArgs.from_cli_args",
          upstream="builds EngineArgs from the parsed flags, ignoring the ones it does not know",
          why="folds --device and --override-neuron-config into additional_config",
          until=NEURON_ARGS_UNTIL, wrap=engine_args.from_cli, params=("args",)),
    Patch("best-of", "vllm.entrypoints.openai.completion.protocol",
          "CompletionRequest.to_sampling_params",
          upstream="ignores best_of (V1 dropped it): one sample instead of the best of k",
          why="best_of > n samples best_of candidates with their logprobs",
          until="upstream implements best_of on V1", wrap=best_of.completion_sampling_params,
          params=("max_tokens",)),
    Patch("best-of", "vllm.entrypoints.openai.completion.protocol",
          "CompletionRequest.to_beam_search_params",
          upstream="ignores best_of", why="best_of > n with beam search is refused by name",
          until="upstream implements best_of on V1",
          wrap=best_of.completion_beam_search_params, params=("max_tokens",)),
    *(Patch("null-max-tokens", "vllm.entrypoints.openai.completion.protocol",
            f"CompletionRequest.{method}",
            upstream='computes "max_tokens": null as the room left in the context, then asserts '
                     "max_tokens is not None building the response: HTTP 500 after generating",
            why="the request keeps the computed max_tokens, so it is answered",
            until="upstream's completion response reads the computed max_tokens",
            wrap=getattr(null_max_tokens, f"completion_{kind}"), params=("max_tokens",))
      for method, kind in (("to_sampling_params", "sampling_params"),
                           ("to_beam_search_params", "beam_search_params"))),
    Patch("detokenize-ids", "vllm.entrypoints.serve.tokenize.serving",
          "OpenAIServingTokenization.create_detokenize",
          upstream="hands the token ids to the tokenizer unchecked: an id out of the "
                   "vocabulary (negative, or past 2^63) is HTTP 500",
          why="an id out of the vocabulary is HTTP 400 naming it",
          until="upstream checks detokenize's ids", wrap=detokenize_ids.checked_ids,
          params=("request", "raw_request")),
    Patch("lora-check", "vllm.v1.engine.input_processor", "InputProcessor._validate_lora",
          upstream="checks only that LoRA is enabled; the worker reads the adapter in the "
                   "step that first uses it, where a bad one kills the engine (a step cannot "
                   "fail one request)",
          why="a request's adapter is checked against the model when it arrives: a bad "
              "offline LoRARequest is a ValueError from LLM.generate naming the adapter, and "
              "the engine serves on",
          until="upstream checks adapters before queuing requests, or its worker can fail "
                "one request",
          wrap=lora_check.checked_adapter, params=("lora_request",)),
    Patch("best-of", COMPLETION_SERVING,
          "OpenAIServingCompletion.request_output_to_completion_response",
          upstream="returns every candidate",
          why="keeps the n likeliest of best_of candidates, bills all",
          until="upstream implements best_of on V1", wrap=best_of.completion_response,
          params=("final_res_batch", "request", "request_id")),
    Patch("best-of", "vllm.entrypoints.openai.chat_completion.protocol",
          "ChatCompletionRequest.to_sampling_params",
          upstream="ignores best_of", why="refuses best_of != n by name (OpenAI's chat has none)",
          until="upstream refuses unknown sampling fields", wrap=best_of.chat_sampling_params,
          params=("max_tokens",)),
    *(Patch("error-status", module, attribute,
            upstream="an exception from the handler reaches the client as HTTP 200 with an "
                     "error body (the route returns an ErrorResponse object)",
            why="a failed request is HTTP 500 (or its error's status), as the body says",
            until="upstream's routes send the status of the errors they catch",
            wrap=error_status.returning_errors, params=("request", "raw_request"))
      for module, attribute in HANDLERS),
    *(Patch("queue-bound", module, attribute,
            upstream="queues every request, however many wait (0.16 has no "
                     "--max-num-queued-reqs)",
            why="--max-num-queued-reqs: past the bound HTTP 503 naming it",
            until="the pin reaches a vLLM with --max-num-queued-reqs (0.33 has it)",
            wrap=queue_bound.admitting, params=("request", "raw_request"))
      for module, attribute in HANDLERS),
    Patch("drain", API_SERVER, "serve_http",
          upstream="on SIGTERM cancels the HTTP server at once, cutting requests in flight",
          why="--shutdown-timeout: SIGTERM lets accepted requests finish first",
          until="the pin reaches a vLLM with --shutdown-timeout (0.33 has it)",
          wrap=drain.draining_serve, params=("app",)),
    Patch("drain", ASYNC_LLM, "AsyncLLM.shutdown",
          upstream="stops the engine; requests still open never hear of it",
          why="open requests end as aborted first, so no stream hangs",
          until="upstream aborts open requests on shutdown",
          wrap=drain.aborting_shutdown),
    Patch("engine-death", "vllm.entrypoints.launcher", "terminate_if_errored",
          upstream="stops the server when the engine died, and the process exits 0",
          why="notes the death so the server exits 1 (a supervisor sees a crash)",
          until="upstream exits non-zero after an engine death",
          wrap=engine_death.noting_death, params=("server", "engine")),
    *(Patch("engine-death", module, "run_server_worker",
            upstream="returns normally after an engine death",
            why="raises SystemExit(1) once the server stopped after an engine death",
            until="upstream exits non-zero after an engine death",
            wrap=engine_death.reporting_death, params=("listen_address", "sock", "args"))
      for module in (API_SERVER, CLI_SERVE)),
    *(Patch("startup-signal", module, "run_server_worker",
            upstream="a SIGTERM while it waits for the engine core is lost in pyzmq's poll",
            why="SIGTERM/SIGINT during start-up stops the engine core (and a compile) and "
                "exits 0",
            until="upstream's start-up handles SIGTERM during the engine core's start",
            wrap=startup_signal.stoppable, params=("listen_address", "sock", "args"))
      for module in (API_SERVER, CLI_SERVE)),
    Patch("clean-exit", "vllm.v1.engine.core_client", "MPClient.__init__",
          upstream="stops the engine core from a finalizer that runs after multiprocessing "
                   "has killed it at exit, so the last line of a script is an ERROR",
          why="the client's shutdown runs at exit before multiprocessing's hook",
          until="upstream shuts its engine clients down before multiprocessing's exit hook",
          wrap=clean_exit.shutdown_at_exit, params=("vllm_config", "executor_class")),
    Patch("decode-slots", "vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots",
          upstream="does the full block bookkeeping for every scheduled request",
          why="applied per decode step by vllm_neuronx.scheduler: with one block of "
              "max_model_len per sequence a decode never allocates (a third of the host's "
              "time per step at batch 32)",
          until="never: it is the contiguous KV layout's short cut",
          params=("request", "num_new_tokens", "num_lookahead_tokens")),
    Patch("native-top-k-top-p", "vllm.v1.sample.ops.topk_topp_sampler",
          "TopKTopPSampler.forward_native",
          upstream="picks a CUDA/FlashInfer or vllm._C top-k/top-p kernel by platform",
          why="vllm_neuronx.worker.host_sampler binds its sampler's forward to this "
              "pure-PyTorch one: the pure-Python vLLM has no vllm._C",
          until="never: the pure-Python install has no kernels",
          params=("logits", "generators", "k", "p")),
)
