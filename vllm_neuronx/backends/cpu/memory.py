"""Large tensors on 2 MB pages, where the kernel allows it; tables read a row at a
time mapped from their file.

Why: a decode step streams every weight once, 4 KB page after 4 KB page, and a
core's hardware prefetchers stop at each page boundary while its TLB misses on each
new page. On transparent huge pages (``madvise`` mode, the common default) the same
SmolLM2 weights streamed at 17-19 GB/s against 14-16, and a decode step took 12.6-15
against 15.7-16.1 ms (same machine, alternating runs). Where the kernel refuses
(THP off, not Linux) these are ordinary pages.

The memory is a fresh anonymous mapping: the kernel hands it over zeroed, and maps
each page at its first touch, so a KV cache costs no time (and no RSS) up front for
the lines a server never reaches.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import struct

import torch

HUGE_PAGE = 2 << 20
PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of ``nbytes``, 2 MB-aligned, advised onto huge pages
    before anything touches it."""
    # Private: a shared anonymous mapping is shmem, which THP's ``enabled`` does not cover.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping open
    start = -raw.data_ptr() % HUGE_PAGE
    buffer = raw[start:start + nbytes]
    advise = _madvise()
    if advise is not None and nbytes >= HUGE_PAGE:  # the whole 2 MB pages inside it
        advise(buffer.data_ptr(), nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return buffer


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return huge_page_bytes(dtype.itemsize * torch.Size(shape).numel()).view(dtype).view(shape)


# safetensors' dtype names, for the tensors we map.
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16,
                       "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn}


def mapped_tensor(path: str, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, mapped from the file, not read: a page
    becomes resident when a row on it is first read. Why: the embedding table is looked
    up a few rows per step (SmolLM2's is a fifth of its weights), so only the rows of
    tokens seen take memory. Private (copy-on-write) so that torch may view it."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[name]
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    flat = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=8 + header_len + begin)
    return flat.view(info["shape"])


def drop_pages(t: torch.Tensor) -> None:
    """Let the pages of a mapped tensor go (read back from the file if used again):
    after a pass over all of it, e.g. packing a tied LM head from the embedding."""
    advise = _madvise()
    if advise is None:
        return
    start = t.data_ptr() // PAGE * PAGE
    advise(start, t.data_ptr() + t.nbytes - start, MADV_DONTNEED)
