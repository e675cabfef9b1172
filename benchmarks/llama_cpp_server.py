"""llama-cpp-python's OpenAI server, adjusted for ``vllm bench serve``.

Two changes to ``python -m llama_cpp.server`` (same flags otherwise):

- The request-id check is off. The server validates ``x-request-id`` as a UUID
  (starlette-context's RequestIdPlugin) and answers anything else with HTTP 400, while
  the benchmark client sends ids such as ``bench-1a2b3c4d-0``.
- A streamed completion ends with a usage chunk holding the number of tokens the
  model generated, as OpenAI's ``stream_options.include_usage`` does. Without it the
  client counts output tokens by re-tokenizing the streamed text, which undercounts
  (random tokens do not survive a decode/encode round trip) and so understates
  llama.cpp's tok/s. The benchmark sends min_tokens = max_tokens, so no
  end-of-generation token is ever sampled and every generated token is output.

Runs in the llama.cpp venv that ``benchmarks/serving.py`` builds.
"""

import llama_cpp
import starlette_context.plugins as plugins


def _lenient_request_ids() -> None:
    """Make every RequestIdPlugin accept any id (it would reject non-UUIDs)."""
    original = plugins.RequestIdPlugin.__init__

    def init(self, *args, **kwargs):
        kwargs["validate"] = False
        original(self, *args, **kwargs)

    plugins.RequestIdPlugin.__init__ = init


def _usage_in_streams() -> None:
    """Count the tokens ``generate`` yields and append them as a final usage chunk."""
    generate = llama_cpp.Llama.generate
    create_completion = llama_cpp.Llama.create_completion

    def counting_generate(self, *args, **kwargs):
        for token in generate(self, *args, **kwargs):
            self.bench_generated_tokens += 1
            yield token

    def with_usage(self, chunks):
        self.bench_generated_tokens = 0  # the server runs one completion at a time
        last = None
        for chunk in chunks:
            last = chunk
            yield chunk
        if last is not None:
            yield {"id": last["id"], "object": last["object"], "created": last["created"],
                   "model": last["model"], "choices": [],
                   "usage": {"completion_tokens": self.bench_generated_tokens}}

    def completion(self, *args, **kwargs):
        result = create_completion(self, *args, **kwargs)
        return with_usage(self, result) if kwargs.get("stream") else result

    llama_cpp.Llama.generate = counting_generate
    llama_cpp.Llama.create_completion = completion


if __name__ == "__main__":
    _lenient_request_ids()
    _usage_in_streams()
    from llama_cpp.server.__main__ import main

    main()
