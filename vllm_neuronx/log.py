"""Loggers under vLLM's "vllm" namespace, so our lines share its handler and format."""

import logging


def get_logger(module: str) -> logging.Logger:
    return logging.getLogger("vllm." + module.removeprefix("vllm_"))
