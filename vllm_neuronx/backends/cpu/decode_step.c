/* One decode step of a Llama-family model, every layer, in one call and one OpenMP
 * parallel region (and a small prefill: the rows of one line at positions 0..n-1).
 *
 * Why: at a few rows a decode step is a few hundred small operations per token
 * (norms, rotary, the KV write, attention, SiLU) around the matmuls. Through torch
 * each one is a dispatch and most are a parallel region of their own: about 1,800
 * per SmolLM2 step, 7 of its 24 ms at batch 1, and each one a point where a thread
 * the OS has lent to another process (the API server, a client) stalls the team.
 * Here the team enters once per step and meets at a barrier between phases.
 *
 * The arithmetic is that of llama.py (and Hugging Face): fp32 activations,
 * RMSNorm, rotary as x*cos + rotate_half(x)*sin, softmax attention over each row's
 * own positions (and its sliding window), SiLU(gate)*up; the matmuls are
 * matmul.c's over bf16, int8 or fp8 weights. The KV cache is in the model's dtype (fp32
 * or bf16) or in e4m3fn bytes (kv_cache_quant), each K/V value rounded as torch casts it
 * and widened when read, in lines
 * of max_len positions or in blocks read through a block table (Model's block_size: the
 * prefix-cached, chunked layout). Of the families' variations it handles biases on
 * q, k and v (Qwen2), the per-head RMSNorm of queries and keys (Qwen3) and experts
 * (Mixtral, Qwen3-MoE: llama.py's routing, experts added in index order); models with
 * other biases take the torch path. Rows may run LoRA adapters (lora.py's deltas on the
 * four fused matmuls, in fp32: lora_shrink_rows and lora_expand_rows below); a step with
 * no adapter row skips all of it.
 */
#include <math.h>
#include <omp.h>
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "simd.h"

static int qkv_width(const Model *md) { return (md->heads + 2 * md->kv_heads) * md->head_dim; }

static int widest_mlp(const Model *md) {
    return md->expert_size > md->intermediate ? md->expert_size : md->intermediate;
}

/* LoRA rows are taken by adapter slot, up to LORA_ROWS of one slot at a time: each row of
 * A and each block of B is read once per group of rows, and the group's sums stay in
 * registers (4 rows x 3 vectors of columns: 12 of AVX2's 16 registers). */
#define LORA_ROWS 4
#define LORA_COLS (3 * VW)
/* B's rows are read LORA_COLS columns at a time, dozens of them at once (a rank each, of
 * every adapter of the step), too many strided streams for the hardware prefetcher:
 * each is prefetched into L2 four chunks ahead (SmolLM2, 32 rows over 4 adapters of rank
 * 16, AVX2 EPYC: a step 91.7 -> 88.4 ms, base 79.5). */
#define LORA_AHEAD (4 * LORA_COLS)

typedef struct {
    int slot, n, rows[LORA_ROWS];
} LoraGroup;

/* The activations, and for experts the gathered rows, their sum and each row's routing. */
static long step_floats(const Model *md, int m) {
    long dense = 2L * md->hidden + qkv_width(md) + md->heads * md->head_dim + 3L * widest_mlp(md);
    long moe = md->experts ? 2L * md->hidden + 4L * md->experts_per_token + md->experts : 0;
    return (dense + moe) * m + (md->experts ? md->experts + 1 : 0);
}

/* Floats of scratch a step of ``m`` rows needs (kernels.py allocates it once): the step's,
 * and with LoRA each row's x . A^T (lora_rank wide) and the rows' groups (at most m). */
long decode_scratch_floats(const Model *md, int m) {
    long lora = md->lora_slots ? (long)m * md->lora_rank
                                     + (long)m * (long)(sizeof(LoraGroup) / sizeof(float))
                               : 0;
    return step_floats(md, m) + lora;
}

static float dot(const float *a, const float *b, int d) {
    vec acc = vzero();
    for (int j = 0; j < d; j += VW)
        acc = vfma(vload_n(a + j, d - j), vload_n(b + j, d - j), acc);
    return vsum(acc);
}

static void rms_norm_rows(const float *x, const float *w, float *out, int m, int n, float eps) {
#pragma omp for schedule(static)
    for (int r = 0; r < m; r++) {
        const float *xr = x + (long)r * n;
        float inv = 1.0f / sqrtf(dot(xr, xr, n) / n + eps);
        for (int j = 0; j < n; j++)
            out[(long)r * n + j] = w[j] * (xr[j] * inv);
    }
}

static void add_to(float *v, const float *bias, int n) {
    for (int j = 0; j < n; j++)
        v[j] += bias[j];
}

/* RMSNorm of one head in place (HF's arithmetic: fp32, weight * (x * rsqrt(mean + eps))). */
static void norm_head(float *v, const float *w, int d, float eps) {
    float inv = 1.0f / sqrtf(dot(v, v, d) / d + eps);
    for (int j = 0; j < d; j++)
        v[j] = w[j] * (v[j] * inv);
}

/* Where a KV head's values for ``pos`` start in the cache: in the row's line, or (block
 * layout) in the block its table row gives ``pos``. */
static long kv_at(const Model *md, long line, int kvh, long pos, const long *block_table,
                  int table_width) {
    int d = md->head_dim;
    if (md->block_size == 0)
        return ((line * md->kv_heads + kvh) * md->max_len + pos) * d;
    long block = block_table[line * table_width + pos / md->block_size];
    return ((block * md->block_size + pos % md->block_size) * md->kv_heads + kvh) * d;
}

/* Each query and key head in place: its bias, its norm and the rotary; the key and
 * value heads into the KV cache at (line, head, position), or at (the block of the
 * position in the row's table, offset, head). */
static void rotate_and_store(const Model *md, const Layer *ly, float *qkv, int m,
                             const long *pos, const long *line, const long *block_table,
                             int table_width) {
    int d = md->head_dim, half = d / 2, heads = md->heads + md->kv_heads, w = qkv_width(md);
    long v_offset = (long)md->kv_heads * d;  /* from a key head to its value head */
#pragma omp for schedule(static)
    for (int item = 0; item < m * heads; item++) {
        int r = item / heads, h = item % heads;
        float *v = qkv + (long)r * w + (long)h * d;
        if (ly->qkv_bias != NULL) {
            add_to(v, ly->qkv_bias + (long)h * d, d);
            if (h >= md->heads)
                add_to(v + v_offset, ly->qkv_bias + (long)h * d + v_offset, d);
        }
        const float *norm = h < md->heads ? ly->q_norm : ly->k_norm;
        if (norm != NULL)
            norm_head(v, norm, d, md->eps);
        const float *c = md->cos + pos[r] * d, *s = md->sin + pos[r] * d;
        for (int j = 0; j < half; j++) {
            float a = v[j], b = v[j + half];
            v[j] = a * c[j] - b * s[j];
            v[j + half] = b * c[j + half] + a * s[j + half];
        }
        if (h >= md->heads) {
            int kvh = h - md->heads;
            long at = kv_at(md, line[r], kvh, pos[r], block_table, table_width);
            if (md->kv_fp8) {
                for (int j = 0; j < d; j++) {
                    ((uint8_t *)ly->k_cache)[at + j] = fp8_from_float(v[j]);
                    ((uint8_t *)ly->v_cache)[at + j] = fp8_from_float(v[v_offset + j]);
                }
            } else if (md->kv_bf16) {
                for (int j = 0; j < d; j++) {
                    ((uint16_t *)ly->k_cache)[at + j] = bf16_from_float(v[j]);
                    ((uint16_t *)ly->v_cache)[at + j] = bf16_from_float(v[v_offset + j]);
                }
            } else {
                memcpy((float *)ly->k_cache + at, v, d * sizeof(float));
                memcpy((float *)ly->v_cache + at, v + v_offset, d * sizeof(float));
            }
        }
    }
}

/* Positions scored at once: their dot products are independent (the out-of-order core
 * overlaps them), and the running maximum rescales the sums once per chunk. */
#define CHUNK 64

/* The KV cache's formats: fp32, e4m3fn bytes (kv_cache_quant), bf16 (the model's dtype). */
enum { KV_FP32, KV_FP8, KV_BF16 };

static inline int kv_format(const Model *md) {
    return md->kv_fp8 ? KV_FP8 : md->kv_bf16 ? KV_BF16 : KV_FP32;
}

/* Bytes per cached value of format ``kvf``. */
static inline int kv_width(const int kvf) { return kvf == KV_FP8 ? 1 : kvf == KV_BF16 ? 2 : 4; }

/* The first ``n`` of VW cached values from ``at`` (the rest read as 0), widened: fp8's
 * are the values / FP8_UNIT (a power of two, exact); an fp8 cache's head_dim is a multiple
 * of VW (native.py checks it). */
static inline __attribute__((always_inline)) vec
kv_load(const void *cache, long at, int n, const int kvf) {
    if (kvf == KV_FP8)
        return vwiden_fp8((const uint8_t *)cache + at);
    if (kvf == KV_BF16) {
        if (n >= VW)
            return vwiden((const uint16_t *)cache + at);
        uint16_t tail[VW] = {0};  /* a head narrower than the vectors (tiny models) */
        memcpy(tail, (const uint16_t *)cache + at, n * sizeof(uint16_t));
        return vwiden(tail);
    }
    return vload_n((const float *)cache + at, n);
}

/* q . the key at ``at`` of a KV cache of format ``kvf``. */
static inline __attribute__((always_inline)) float
dot_key(const float *q, const void *keys, long at, int d, const int kvf) {
    if (kvf == KV_FP32)
        return dot(q, (const float *)keys + at, d);
    vec acc = vzero();
    for (int j = 0; j < d; j += VW)
        acc = vfma(vload_n(q + j, d - j), kv_load(keys, at + j, d - j, kvf), acc);
    return vsum(acc) * (kvf == KV_FP8 ? FP8_UNIT : 1.0f);
}

/* Blocked attention: positions this far ahead are prefetched (blocks are scattered, so
 * the hardware prefetcher loses the stream at each block's end). */
#define KV_AHEAD 8

/* The cache lines of the head of ``bytes`` at ``p`` into L1. */
static inline __attribute__((always_inline)) void prefetch_head(const char *p, int bytes) {
    for (int b = 0; b < bytes; b += 64)
        _mm_prefetch(p + b, _MM_HINT_T0);
}

/* A chunk's scores ``s`` (``len``, their maximum ``chunk_top``) onto a head's running
 * softmax: its sums ``acc`` (``vectors`` of them), ``top`` and ``total`` rescaled where the
 * chunk raises the maximum, then ``s`` becomes e^(s - top). */
static inline __attribute__((always_inline)) void
softmax_chunk(float *s, int len, float chunk_top, float *top, float *total, vec *acc,
              int vectors) {
    if (chunk_top > *top) {
        float shrink = expf(*top - chunk_top);  /* 0 on the first chunk */
        for (int v = 0; v < vectors; v++)
            acc[v] = vmul(acc[v], vset1(shrink));
        *total *= shrink;
        *top = chunk_top;
    }
    for (int j = 0; j < len; j += VW)
        vstore_n(s + j, vexp(vsub(vload_n(s + j, len - j), vset1(*top))), len - j);
}

/* One query head over one chunk of positions (``len`` from ``c0``) of its KV head, on
 * its running softmax: ``acc`` (d floats), ``top`` and ``total`` in memory between chunks,
 * in registers within one. Inlined with a constant ``d`` (64, 128) and cache format
 * ``kvf``. ``blocked`` (a constant too): ``offsets`` holds each position's offset from
 * ``keys`` and ``values``; otherwise positions are d apart from them. ``prefetch``: the first head over the chunk brings the
 * blocks' scattered positions in ahead (the hardware prefetcher loses the stream at each
 * block's end); the group's other heads find the chunk in L1. */
static inline __attribute__((always_inline)) void
attend_chunk(const float *q, const void *keys, const void *values, float *acc_mem,
             float *top_mem, float *total_mem, long c0, int len, const long *offsets,
             float scale, const int d, const int kvf, const int blocked, int prefetch) {
    vec acc[256 / VW];  /* d <= 256 */
    int vectors = (d + VW - 1) / VW;
    int width = kv_width(kvf);
    for (int v = 0; v < vectors; v++)
        acc[v] = vload_n(acc_mem + VW * v, d - VW * v);
    float s[CHUNK], top = *top_mem, total = *total_mem, chunk_top = -INFINITY;
    for (int j = 0; j < len; j++) {
        if (blocked && prefetch && j + KV_AHEAD < len)
            prefetch_head((const char *)keys + offsets[j + KV_AHEAD] * width, width * d);
        s[j] = dot_key(q, keys, blocked ? offsets[j] : (c0 + j) * d, d, kvf) * scale;
        chunk_top = s[j] > chunk_top ? s[j] : chunk_top;
    }
    softmax_chunk(s, len, chunk_top, &top, &total, acc, vectors);
    for (int j = 0; j < len; j++) {
        float p = s[j];
        total += p;
        long at = blocked ? offsets[j] : (c0 + j) * d;
        if (blocked && prefetch && j + KV_AHEAD < len)
            prefetch_head((const char *)values + offsets[j + KV_AHEAD] * width, width * d);
        vec pb = vset1(p);
        for (int v = 0; v < vectors; v++)
            acc[v] = vfma(pb, kv_load(values, at + VW * v, d - VW * v, kvf), acc[v]);
    }
    for (int v = 0; v < vectors; v++)
        vstore_n(acc_mem + VW * v, acc[v], d - VW * v);
    *top_mem = top;
    *total_mem = total;
}

/* Heads up to this size widen a bf16 chunk once for a group (2 x 32 KB on the stack)
 * where the group cannot go over it in registers (attend_group_bf16: the block layout,
 * groups of more than REGISTER_GROUP heads). */
#define WIDE_HEAD 128

/* At most this many query heads of one KV head go over its positions together. */
#define MAX_GROUP 8

/* Query heads sharing a KV head that go over a bf16 line in registers (below). */
#define REGISTER_GROUP 4

/* ``n`` query heads (a constant, at most REGISTER_GROUP) of one KV head over positions
 * [first, last] of a bf16 cache in lines, ``d`` (a constant, 64 or 128) apart: each key and
 * value is widened once, into registers, for all n heads, instead of into a buffer the
 * heads read back from L1 (a chunk's widening stored 16 KB and the heads reloaded it n
 * times). Each head's arithmetic is attend_chunk's, in the same order, so the same sums.
 * Each value row is prefetched as its key is scored, and the next chunk's keys as the
 * values are summed: `perf` had the value loop waiting on its loads (AMX Xeon, b=32:
 * attention phase 0.82x; avx512 forced 0.82x, avx2 0.95x). */
static inline __attribute__((always_inline)) void
attend_group_bf16(const float *q, const int n, const uint16_t *keys, const uint16_t *values,
                  float *out, long first, long last, float scale, const int d) {
    enum { MOST = 128 / VW };
    const int nv = d / VW;
    vec acc[REGISTER_GROUP][MOST];
    float s[REGISTER_GROUP][CHUNK], top[REGISTER_GROUP], total[REGISTER_GROUP];
    for (int g = 0; g < n; g++) {
        for (int v = 0; v < nv; v++)
            acc[g][v] = vzero();
        top[g] = -INFINITY;
        total[g] = 0.0f;
    }
    for (long c0 = first; c0 <= last; c0 += CHUNK) {
        int len = last - c0 + 1 < CHUNK ? (int)(last - c0 + 1) : CHUNK;
        float chunk_top[REGISTER_GROUP];
        for (int g = 0; g < n; g++)
            chunk_top[g] = -INFINITY;
        for (int j = 0; j < len; j++) {
            const uint16_t *row = keys + (c0 + j) * d;
            for (int b = 0; b < d * 2; b += 64)
                _mm_prefetch((const char *)(values + (c0 + j) * d) + b, _MM_HINT_T0);
            vec k[MOST];
            for (int v = 0; v < nv; v++)
                k[v] = vwiden(row + VW * v);
            for (int g = 0; g < n; g++) {
                vec dot = vzero();
                for (int v = 0; v < nv; v++)
                    dot = vfma(vload_n(q + (long)g * d + VW * v, VW), k[v], dot);
                float score = vsum(dot) * scale;
                s[g][j] = score;
                chunk_top[g] = score > chunk_top[g] ? score : chunk_top[g];
            }
        }
        for (int g = 0; g < n; g++)
            softmax_chunk(s[g], len, chunk_top[g], top + g, total + g, acc[g], nv);
        for (int j = 0; j < len; j++) {
            const uint16_t *row = values + (c0 + j) * d;
            if (c0 + CHUNK + j <= last)
                for (int b = 0; b < d * 2; b += 64)
                    _mm_prefetch((const char *)(keys + (c0 + CHUNK + j) * d) + b, _MM_HINT_T0);
            vec val[MOST];
            for (int v = 0; v < nv; v++)
                val[v] = vwiden(row + VW * v);
            for (int g = 0; g < n; g++) {
                total[g] += s[g][j];
                vec p = vset1(s[g][j]);
                for (int v = 0; v < nv; v++)
                    acc[g][v] = vfma(p, val[v], acc[g][v]);
            }
        }
    }
    for (int g = 0; g < n; g++) {
        vec inv = vset1(1.0f / total[g]);
        for (int v = 0; v < nv; v++)
            vstore_n(out + (long)g * d + VW * v, vmul(acc[g][v], inv), VW);
    }
}

/* ``n`` query heads of one KV head (``q`` and ``out`` d apart) over positions [first,
 * last]: softmax(q . K^T * scale) . V each. Query heads of a KV head read the same keys and
 * values, so each chunk of positions is read from memory once, for all of them, and stays
 * in L1 while they go over it; each head's arithmetic is what it is alone, in the same
 * order. ``blocked``: the positions are in blocks of ``block_size`` through ``table`` (the
 * row's block table), ``stride`` apart within a block (kv_heads * d); each chunk's offsets
 * are found once, walking (block, offset) without a division per position. */
static inline __attribute__((always_inline)) void
attend_heads(const float *q, int n, const void *keys, const void *values, float *out,
             long first, long last, float scale, const int d, const int kvf,
             const long *table, int block_size, long stride, const int blocked) {
    if (kvf == KV_BF16 && !blocked && (d == 64 || d == 128)) { /* in registers, if n fits */
        const uint16_t *k = keys, *v = values;
        switch (n) {
        case 1: attend_group_bf16(q, 1, k, v, out, first, last, scale, d); return;
        case 2: attend_group_bf16(q, 2, k, v, out, first, last, scale, d); return;
        case 3: attend_group_bf16(q, 3, k, v, out, first, last, scale, d); return;
        case 4: attend_group_bf16(q, 4, k, v, out, first, last, scale, d); return;
        default: break;
        }
    }
    float acc[MAX_GROUP * 256] __attribute__((aligned(64)));
    float wide_k[CHUNK * WIDE_HEAD] __attribute__((aligned(64)));
    float wide_v[CHUNK * WIDE_HEAD] __attribute__((aligned(64)));
    float top[MAX_GROUP], total[MAX_GROUP];
    for (int g = 0; g < n; g++) {
        memset(acc + g * d, 0, d * sizeof(float));
        top[g] = -INFINITY;
        total[g] = 0.0f;
    }
    for (long c0 = first; c0 <= last; c0 += CHUNK) {
        int len = last - c0 + 1 < CHUNK ? (int)(last - c0 + 1) : CHUNK;
        long offsets[CHUNK];  /* blocked: each position's, from keys and values */
        if (blocked) {
            long block = c0 / block_size;
            int in_block = (int)(c0 % block_size);
            long start = table[block] * block_size;
            for (int j = 0; j < len; j++, in_block++) {
                if (in_block == block_size) {  /* the next block (read only if needed) */
                    in_block = 0;
                    start = table[++block] * block_size;
                }
                offsets[j] = (start + in_block) * stride;
            }
        }
        if (kvf == KV_BF16 && n > 1 && d <= WIDE_HEAD) {
            /* The chunk's keys and values widened once for the group's heads, which
             * then read fp32 from L1: the same values, so the same sums (SmolLM2's
             * logits bit-identical), and a third of the widening. AMX Xeon, b=32:
             * attention 16.8 -> 15.8 ms a step (its phase timed alone, 6 rounds). */
            int width = kv_width(KV_BF16);
            for (int j = 0; j < len; j++) {
                long at = blocked ? offsets[j] : (c0 + j) * d;
                if (blocked && j + KV_AHEAD < len) {
                    long ahead = offsets[j + KV_AHEAD] * width;
                    prefetch_head((const char *)keys + ahead, width * d);
                    prefetch_head((const char *)values + ahead, width * d);
                }
                for (int i = 0; i < d; i += VW) {
                    vstore_n(wide_k + j * d + i, kv_load(keys, at + i, d - i, KV_BF16), d - i);
                    vstore_n(wide_v + j * d + i, kv_load(values, at + i, d - i, KV_BF16),
                             d - i);
                }
            }
            for (int g = 0; g < n; g++)
                attend_chunk(q + (long)g * d, wide_k, wide_v, acc + g * d, top + g,
                             total + g, 0, len, NULL, scale, d, KV_FP32, 0, 0);
            continue;
        }
        for (int g = 0; g < n; g++)
            attend_chunk(q + (long)g * d, keys, values, acc + g * d, top + g, total + g, c0,
                         len, offsets, scale, d, kvf, blocked, g == 0);
    }
    for (int g = 0; g < n; g++) {
        vec inv = vset1((kvf == KV_FP8 ? FP8_UNIT : 1.0f) / total[g]);
        for (int i = 0; i < d; i += VW)
            vstore_n(out + (long)g * d + i, vmul(vload_n(acc + g * d + i, d - i), inv), d - i);
    }
}

/* attend_heads with the head size a constant where it is a common one (64, 128). */
static inline __attribute__((always_inline)) void
attend_heads_sized(const float *q, int n, const void *keys, const void *values, float *out,
                   long first, long last, float scale, int d, const int kvf,
                   const long *table, int block_size, long stride, const int blocked) {
    switch (d) {
    case 64: attend_heads(q, n, keys, values, out, first, last, scale, 64, kvf, table,
                          block_size, stride, blocked); break;
    case 128: attend_heads(q, n, keys, values, out, first, last, scale, 128, kvf, table,
                           block_size, stride, blocked); break;
    default: attend_heads(q, n, keys, values, out, first, last, scale, d, kvf, table,
                          block_size, stride, blocked); break;
    }
}

#if VW == 16
/* A prompt's rows attend together (AVX-512): rows r0.. (``rows`` of them) of one KV line
 * at consecutive positions, and the ``group`` query heads from h0 of one KV head, one
 * query to a lane (row-major: lane = row * group + head; RUN_LANES of them at most).
 * Each key is widened once for all of them, and its scores come out as one vector (the
 * queries transposed: q . k is d FMAs with k's values broadcast, no sum across lanes),
 * the sums of values likewise transposed (``ot``: d vectors of the lanes' sums). A
 * per-row pass over a prompt (attend_group_bf16) sums each score across lanes and widens
 * each key once per row. Chunks of RUN_LANES keys; keys outside a lane's window (its row's
 * causal end, its sliding window's start) weigh 0. A bf16 or fp32 cache, heads up to
 * WIDE_HEAD, d a multiple of 8. */
#define RUN_LANES 16

/* r[i][j] <- r[j][i]: a 16 x 16 block of floats transposed in registers. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

static inline __attribute__((always_inline)) void
attend_run(const float *qkv, int w, const long *pos, int r0, int rows, int h0, int group,
           const void *keys, const void *values, float *out, int heads, float scale,
           long window, const int d, const int kvf, const long *table, int block_size,
           long stride, const int blocked) {
    float qt[WIDE_HEAD * RUN_LANES] __attribute__((aligned(64)));
    float ot[WIDE_HEAD * RUN_LANES] __attribute__((aligned(64)));
    float kw[RUN_LANES * WIDE_HEAD] __attribute__((aligned(64)));
    float vw[RUN_LANES * WIDE_HEAD] __attribute__((aligned(64)));
    float last_of[RUN_LANES] __attribute__((aligned(64)));
    float first_of[RUN_LANES] __attribute__((aligned(64)));
    int used = rows * group;
    long lo = pos[r0], hi = pos[r0 + rows - 1];
    for (int l = 0; l < RUN_LANES; l++) {
        if (l >= used) {  /* an empty lane: no key is in its window */
            last_of[l] = -1.0f;
            first_of[l] = 0.0f;
            continue;
        }
        int r = r0 + l / group;
        long first = window > 0 && pos[r] - window + 1 > 0 ? pos[r] - window + 1 : 0;
        lo = first < lo ? first : lo;
        last_of[l] = (float)pos[r];  /* positions < 2^24: exact */
        first_of[l] = (float)first;
    }
    for (int i0 = 0; i0 < d; i0 += 16) {  /* qt[i] = the lanes' i-th query values */
        __m512 r[16];
        for (int l = 0; l < RUN_LANES; l++)
            r[l] = l < used ? vload_n(qkv + (long)(r0 + l / group) * w +
                                      (long)(h0 + l % group) * d + i0, d - i0)
                            : _mm512_setzero_ps();
        transpose16(r);
        for (int x = 0; x < 16 && i0 + x < d; x++)
            _mm512_store_ps(qt + (i0 + x) * RUN_LANES, r[x]);
    }
    memset(ot, 0, sizeof(float) * d * RUN_LANES);
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    __m512 last_v = _mm512_load_ps(last_of), first_v = _mm512_load_ps(first_of);
    /* chunks on a grid from position 0, so that a row's sums do not depend on the rows
     * beside it (a masked key adds 0, a maximum that did not rise scales by 1) */
    for (long c0 = lo / RUN_LANES * RUN_LANES; c0 <= hi; c0 += RUN_LANES) {
        int len = hi - c0 + 1 < RUN_LANES ? (int)(hi - c0 + 1) : RUN_LANES;
        for (int j = 0; j < RUN_LANES; j++) {
            long p = c0 + j, at = !blocked ? p * d
                : (table[p / block_size] * block_size + p % block_size) * stride;
            for (int i = 0; i < d; i += VW) {
                vec kv = j < len ? kv_load(keys, at + i, d - i, kvf) : vzero();
                vec vv = j < len ? kv_load(values, at + i, d - i, kvf) : vzero();
                vstore_n(kw + j * d + i, kv, d - i);
                vstore_n(vw + j * d + i, vv, d - i);
            }
        }
        __m512 s[RUN_LANES];
        for (int j = 0; j < RUN_LANES; j++)
            s[j] = _mm512_setzero_ps();
        for (int i = 0; i < d; i++) {
            __m512 q = _mm512_load_ps(qt + i * RUN_LANES);
            for (int j = 0; j < RUN_LANES; j++)
                s[j] = _mm512_fmadd_ps(q, _mm512_set1_ps(kw[j * d + i]), s[j]);
        }
        __mmask16 in[RUN_LANES];
        __m512 chunk_top = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < RUN_LANES; j++) {
            __m512 at = _mm512_set1_ps((float)(c0 + j));
            in[j] = _mm512_cmp_ps_mask(at, first_v, _CMP_GE_OQ) &
                    _mm512_cmp_ps_mask(at, last_v, _CMP_LE_OQ);
            s[j] = _mm512_mul_ps(s[j], _mm512_set1_ps(scale));
            chunk_top = _mm512_mask_max_ps(chunk_top, in[j], chunk_top, s[j]);
        }
        __mmask16 raised = _mm512_cmp_ps_mask(chunk_top, top, _CMP_GT_OQ);
        if (raised) {  /* rescale the lanes whose maximum rose (sums still 0 on their
                        * first keys, where vexp's clamp makes e^-inf tiny, not NaN) */
            __m512 new_top = _mm512_mask_mov_ps(top, raised, chunk_top);
            __m512 shrink = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), raised,
                                               vexp(_mm512_sub_ps(top, new_top)));
            total = _mm512_mul_ps(total, shrink);
            for (int i = 0; i < d; i++)
                _mm512_store_ps(ot + i * RUN_LANES,
                                _mm512_mul_ps(_mm512_load_ps(ot + i * RUN_LANES), shrink));
            top = new_top;
        }
        __m512 p[RUN_LANES];
        for (int j = 0; j < RUN_LANES; j++) {
            p[j] = _mm512_maskz_mov_ps(in[j], vexp(_mm512_sub_ps(s[j], top)));
            total = _mm512_add_ps(total, p[j]);
        }
        for (int i = 0; i < d; i += 8) {
            __m512 o[8];
            for (int x = 0; x < 8; x++)
                o[x] = _mm512_load_ps(ot + (i + x) * RUN_LANES);
            for (int j = 0; j < len; j++)
                for (int x = 0; x < 8; x++)
                    o[x] = _mm512_fmadd_ps(p[j], _mm512_set1_ps(vw[j * d + i + x]), o[x]);
            for (int x = 0; x < 8; x++)
                _mm512_store_ps(ot + (i + x) * RUN_LANES, o[x]);
        }
    }
    float inv[RUN_LANES] __attribute__((aligned(64)));
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), total));
    for (int i0 = 0; i0 < d; i0 += 16) {  /* back to a row of d per lane */
        __m512 r[16];
        for (int x = 0; x < 16; x++)
            r[x] = i0 + x < d ? _mm512_load_ps(ot + (i0 + x) * RUN_LANES) : _mm512_setzero_ps();
        transpose16(r);
        for (int l = 0; l < used; l++)
            vstore_n(out + (long)(r0 + l / group) * heads * d + (long)(h0 + l % group) * d + i0,
                     _mm512_mul_ps(r[l], _mm512_set1_ps(inv[l])), d - i0);
    }
}

/* A step holding a prompt: this many rows of one line at consecutive positions. A
 * speculation's verify pass (a few rows a line) and decode steps keep attend_rows. */
#define RUN_FROM 16

static inline __attribute__((always_inline)) void
attend_run_sized(const float *qkv, int w, const long *pos, int r0, int rows, int h0,
                 int group, const void *keys, const void *values, float *out, int heads,
                 float scale, long window, int d, const int kvf, const long *table,
                 int block_size, long stride, const int blocked) {
    switch (d) {
    case 64: attend_run(qkv, w, pos, r0, rows, h0, group, keys, values, out, heads, scale,
                        window, 64, kvf, table, block_size, stride, blocked); break;
    case 128: attend_run(qkv, w, pos, r0, rows, h0, group, keys, values, out, heads, scale,
                         window, 128, kvf, table, block_size, stride, blocked); break;
    default: attend_run(qkv, w, pos, r0, rows, h0, group, keys, values, out, heads, scale,
                        window, d, kvf, table, block_size, stride, blocked); break;
    }
}

/* attend_rows for a step holding prompts: items of RUN_LANES / group rows and one KV
 * head, each item's rows split where a run ends (another line, or a gap in positions),
 * each run through attend_run; inlined once per layout (``blocked``) and cache format. */
static inline __attribute__((always_inline)) void
attend_prompts(const Model *md, const Layer *ly, const float *qkv, float *out, int m,
               const long *pos, const long *line, const long *block_table, int table_width,
               const int kvf, const int blocked) {
    int d = md->head_dim, w = qkv_width(md), group = md->heads / md->kv_heads;
    int per = RUN_LANES / group, blocks = (m + per - 1) / per;
    long unit = kv_width(kvf), stride = (long)md->kv_heads * d;
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < blocks * md->kv_heads; item++) {
        int b = item / md->kv_heads, kvh = item % md->kv_heads;
        int end = (b + 1) * per < m ? (b + 1) * per : m;
        for (int r0 = b * per, r1; r0 < end; r0 = r1) {
            for (r1 = r0 + 1; r1 < end && line[r1] == line[r0] && pos[r1] == pos[r1 - 1] + 1;)
                r1++;
            long base = blocked ? (long)kvh * d
                                : (line[r0] * md->kv_heads + kvh) * (long)md->max_len * d;
            const long *table = blocked ? block_table + line[r0] * table_width : NULL;
            attend_run_sized(qkv, w, pos, r0, r1 - r0, kvh * group, group,
                             (const char *)ly->k_cache + base * unit,
                             (const char *)ly->v_cache + base * unit, out, md->heads,
                             md->scale, md->window, d, kvf, table, md->block_size, stride,
                             blocked);
        }
    }
}
#endif

/* Each row's query heads over the row's own positions (and its sliding window), a KV
 * head's query heads together (up to MAX_GROUP) where that leaves the team enough items,
 * else one head an item; inlined once per layout (``blocked``, a constant). */
static inline __attribute__((always_inline)) void
attend_rows(const Model *md, const Layer *ly, const float *qkv, float *out, int m,
            const long *pos, const long *line, const long *block_table, int table_width,
            const int blocked) {
    int d = md->head_dim, w = qkv_width(md), group = md->heads / md->kv_heads;
    int bs = md->block_size;
    long stride = (long)md->kv_heads * d;  /* blocked: from a position to the next */
    /* Heads per item: a whole group where that leaves every thread an item (each KV head
     * is then read once; b=1 on 2 threads, 3 KV heads: attention 0.61-0.65x against a
     * head an item), else one head an item. */
    int per = m * md->kv_heads >= omp_get_num_threads()
        ? (group < MAX_GROUP ? group : MAX_GROUP) : 1;
    int pieces = (group + per - 1) / per;  /* items per (row, KV head) */
    int kvf = kv_format(md);
    long unit = kv_width(kvf);
    /* Items as the threads come for them: rows differ in length (a server's rows, a
     * prompt's causal rows: a static split gave one thread a prompt's short half, the
     * other its long half) and a thread the VM slows takes fewer. SmolLM2 on 2 cores,
     * old and new alternating, 12 rounds: 32x128 prefill one prompt a call 0.94x, 8 a
     * call 0.90x; b=32 at contexts 130-379 0.96x. */
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < m * md->kv_heads * pieces; item++) {
        int r = item / (md->kv_heads * pieces), rest = item % (md->kv_heads * pieces);
        int kvh = rest / pieces, h = kvh * group + (rest % pieces) * per;
        int n = group - (h - kvh * group) < per ? group - (h - kvh * group) : per;
        long last = pos[r];
        long first = md->window > 0 && last - md->window + 1 > 0 ? last - md->window + 1 : 0;
        long base = blocked ? (long)kvh * d
                            : (line[r] * md->kv_heads + kvh) * (long)md->max_len * d;
        const long *table = blocked ? block_table + line[r] * table_width : NULL;
        const float *q = qkv + (long)r * w + (long)h * d;
        float *o = out + (long)r * md->heads * d + (long)h * d;
        const char *keys = (const char *)ly->k_cache + base * unit;
        const char *values = (const char *)ly->v_cache + base * unit;
        if (kvf == KV_FP8)
            attend_heads_sized(q, n, keys, values, o, first, last, md->scale, d, KV_FP8, table,
                               bs, stride, blocked);
        else if (kvf == KV_BF16)
            attend_heads_sized(q, n, keys, values, o, first, last, md->scale, d, KV_BF16, table,
                               bs, stride, blocked);
        else
            attend_heads_sized(q, n, keys, values, o, first, last, md->scale, d, KV_FP32, table,
                               bs, stride, blocked);
    }
}

/* Whether a step's rows attend through attend_prompts: an AVX-512 build, a bf16 or fp32
 * cache, heads it takes, and a prompt among the rows (RUN_FROM of one line at consecutive
 * positions). The same for every layer: found once a step. */
static int by_prompts(const Model *md, const long *pos, const long *line, int m) {
#if VW == 16
    int d = md->head_dim;
    if (kv_format(md) == KV_FP8 || d > WIDE_HEAD || d % 8 != 0 ||
        md->heads / md->kv_heads > RUN_LANES)
        return 0;
    for (int r = 1, run = 1; r < m; r++) {
        run = line[r] == line[r - 1] && pos[r] == pos[r - 1] + 1 ? run + 1 : 1;
        if (run >= RUN_FROM)
            return 1;
    }
#else
    (void)md, (void)pos, (void)line, (void)m;
#endif
    return 0;
}

static void attend(const Model *md, const Layer *ly, const float *qkv, float *out, int m,
                   const long *pos, const long *line, const long *block_table,
                   int table_width, int prompts) {
#if VW == 16
    if (prompts) {
        int kvf = kv_format(md);
        if (md->block_size > 0 && kvf == KV_BF16)
            attend_prompts(md, ly, qkv, out, m, pos, line, block_table, table_width, KV_BF16, 1);
        else if (md->block_size > 0)
            attend_prompts(md, ly, qkv, out, m, pos, line, block_table, table_width, KV_FP32, 1);
        else if (kvf == KV_BF16)
            attend_prompts(md, ly, qkv, out, m, pos, line, NULL, 0, KV_BF16, 0);
        else
            attend_prompts(md, ly, qkv, out, m, pos, line, NULL, 0, KV_FP32, 0);
        return;
    }
#else
    (void)prompts;
#endif
    if (md->block_size > 0)
        attend_rows(md, ly, qkv, out, m, pos, line, block_table, table_width, 1);
    else
        attend_rows(md, ly, qkv, out, m, pos, line, NULL, 0, 0);
}

static void silu_times_up(const float *gate_up, float *out, int m, int n) {
#pragma omp for schedule(static)
    for (int r = 0; r < m; r++) {
        const float *g = gate_up + (long)r * 2 * n, *u = g + n;
        for (int j = 0; j < n; j += VW) {
            vec gj = vload_n(g + j, n - j);
            vec silu = vdiv(gj, vadd(vset1(1.0f), vexp(vsub(vzero(), gj))));
            vstore_n(out + (long)r * n + j, vmul(silu, vload_n(u + j, n - j)), n - j);
        }
    }
}

/* Softmax over each row's router logits, its top ``k`` experts (the larger index loses a
 * tie, the lower index) and their weights, renormalised with norm_topk. */
static void route(const Model *md, const float *logits, int m, float *ids, float *weights) {
    int E = md->experts, k = md->experts_per_token;
#pragma omp for schedule(static)
    for (int r = 0; r < m; r++) {
        const float *l = logits + (long)r * E;
        float top = -INFINITY, total = 0.0f, chosen = 0.0f;
        for (int e = 0; e < E; e++)
            top = l[e] > top ? l[e] : top;
        for (int e = 0; e < E; e++)
            total += expf(l[e] - top);
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++)
                    taken |= (int)ids[(long)r * k + i] == e;
                if (!taken && (best < 0 || l[e] > l[best]))
                    best = e;
            }
            ids[(long)r * k + j] = (float)best;
            weights[(long)r * k + j] = expf(l[best] - top) / total;
            chosen += weights[(long)r * k + j];
        }
        if (md->norm_topk)
            for (int j = 0; j < k; j++)
                weights[(long)r * k + j] /= chosen;
    }
}

/* The experts' MLP of rows h [m, hidden], added to x: each expert in index order over
 * the rows that chose it (gathered, multiplied, added back by their weights). The rows
 * are sorted by expert once, so the team reads each expert's count from its own slot. */
static void experts(const Model *md, const Layer *ly, const float *h, float *x, int m,
                    float *moe, float *gu, float *act, float *out) {
    int H = md->hidden, I = md->expert_size, E = md->experts, k = md->experts_per_token;
    float *sum = moe, *gathered = sum + (long)m * H, *ids = gathered + (long)m * H;
    float *weights = ids + (long)m * k, *rows = weights + (long)m * k;
    float *row_w = rows + (long)m * k, *logits = row_w + (long)m * k;
    int *first = (int *)(logits + (long)m * E);  /* [E + 1]: each expert's rows */
    matmul_team(h, ly->router, logits, m, 0);
    route(md, logits, m, ids, weights);
#pragma omp for schedule(static)
    for (long i = 0; i < (long)m * H; i++)
        sum[i] = 0.0f;
#pragma omp single
    {
        int n = 0;
        for (int e = 0; e < E; e++) {
            first[e] = n;
            for (int r = 0; r < m; r++)
                for (int j = 0; j < k; j++)
                    if ((int)ids[(long)r * k + j] == e) {
                        rows[n] = (float)r;
                        row_w[n++] = weights[(long)r * k + j];
                    }
        }
        first[E] = n;
    }
    for (int e = 0; e < E; e++) {
        int n = first[e + 1] - first[e];
        const float *er = rows + first[e], *ew = row_w + first[e];
        if (n == 0)
            continue;
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++)
            memcpy(gathered + (long)i * H, h + (long)er[i] * H, H * sizeof(float));
        matmul_team(gathered, ly->expert_gate_up + e, gu, n, 0);
        silu_times_up(gu, act, n, I);
        matmul_team(act, ly->expert_down + e, out, n, 0);
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            float *dst = sum + (long)er[i] * H;
            const float *src = out + (long)i * H;
            for (int j = 0; j < H; j++)
                dst[j] += src[j] * ew[i];
        }
    }
#pragma omp for schedule(static)
    for (long i = 0; i < (long)m * H; i++)
        x[i] += sum[i];
}

/* The rows that run an adapter, by slot, in groups of up to LORA_ROWS; returns how many
 * groups (0: every row runs the base model). */
static int lora_groups(const Model *md, const int *row_slot, int m, LoraGroup *groups) {
    int n = 0;
    for (int s = 1; s < md->lora_slots; s++) {
        LoraGroup *g = NULL;
        for (int r = 0; r < m; r++) {
            if (row_slot[r] != s)
                continue;
            if (g == NULL || g->n == LORA_ROWS) {
                g = groups + n++;
                g->slot = s;
                g->n = 0;
            }
            g->rows[g->n++] = r;
        }
    }
    return n;
}

/* t[row][j] = A[j] . x[row] for the ``n`` rows of a group (inlined with a constant n). */
static inline __attribute__((always_inline)) void
lora_shrink(const float *a, const float *x, int k, const int *rows, const int n, float *t,
            int stride, int j) {
    vec acc[LORA_ROWS];
    for (int r = 0; r < n; r++)
        acc[r] = vzero();
    for (int i = 0; i < k; i += VW) {
        vec av = vload_n(a + i, k - i);
        for (int r = 0; r < n; r++)
            acc[r] = vfma(av, vload_n(x + (long)rows[r] * k + i, k - i), acc[r]);
    }
    for (int r = 0; r < n; r++)
        t[(long)rows[r] * stride + j] = vsum(acc[r]);
}

/* y[row][c0, c0 + cols) += sum over ranks j in [r0, r1) of t[row][j] * Bt[j][c0, c0 + cols),
 * cols <= LORA_COLS, for the ``n`` rows of a group (inlined with a constant n). */
static inline __attribute__((always_inline)) void
lora_expand(const float *bt, int width, int c0, int cols, int r0, int r1, const float *t,
            int stride, const int *rows, const int n, float *y) {
    vec acc[LORA_ROWS][3];
    for (int r = 0; r < n; r++)
        for (int v = 0; v < 3; v++)
            acc[r][v] = vzero();
    for (int j = r0; j < r1; j++) {
        const float *b = bt + (long)j * width + c0;
        for (int line = 0; line < LORA_COLS; line += 16)  /* 16 floats a cache line */
            _mm_prefetch((const char *)(b + LORA_AHEAD + line), _MM_HINT_T1);
        vec b0 = vload_n(b, cols);
        vec b1 = cols > VW ? vload_n(b + VW, cols - VW) : vzero();
        vec b2 = cols > 2 * VW ? vload_n(b + 2 * VW, cols - 2 * VW) : vzero();
        for (int r = 0; r < n; r++) {
            vec tb = vset1(t[(long)rows[r] * stride + j]);
            acc[r][0] = vfma(tb, b0, acc[r][0]);
            acc[r][1] = vfma(tb, b1, acc[r][1]);
            acc[r][2] = vfma(tb, b2, acc[r][2]);
        }
    }
    for (int r = 0; r < n; r++) {
        float *yr = y + (long)rows[r] * width + c0;
        for (int v = 0; v < 3 && cols - VW * v > 0; v++)
            vstore_n(yr + VW * v, vadd(vload_n(yr + VW * v, cols - VW * v), acc[r][v]),
                     cols - VW * v);
    }
}

/* The widest rank among the grouped rows' deltas in ``table`` (0: nothing to do). */
static int lora_ranks(const Lora *table, const LoraGroup *groups, int n_groups) {
    int ranks = 0;
    for (int g = 0; g < n_groups && table != NULL; g++)
        ranks = table[groups[g].slot].rank > ranks ? table[groups[g].slot].rank : ranks;
    return ranks;
}

/* LoRA on one fused matmul y [m, n] = x [m, k] . W^T, in two halves around it:
 * lora_shrink_rows before (t = x . A^T of each grouped row, its slot's A; the team shares
 * out (group, rank) pairs and does not wait: the matmul's barrier ends both), then
 * lora_expand_rows after (y += t . B^T, the team sharing out columns of y, only each
 * part's block of B read). That is lora.py's arithmetic in fp32: the rank-wide products,
 * then their sum added to y. Every thread of the team must call both; with no groups or
 * no table (LoRA off) they return at once. */
static void lora_shrink_rows(const Lora *table, const LoraGroup *groups, int n_groups,
                             const float *x, int k, float *t, int stride) {
    int ranks = lora_ranks(table, groups, n_groups);
    if (ranks == 0)
        return;
#pragma omp for schedule(static) nowait
    for (int item = 0; item < n_groups * ranks; item++) {
        const LoraGroup *g = groups + item / ranks;
        const Lora *d = table + g->slot;
        int j = item % ranks;
        if (j >= d->rank)
            continue;
        const float *a = d->a + (long)j * k;
        switch (g->n) {
        case 4: lora_shrink(a, x, k, g->rows, 4, t, stride, j); break;
        case 3: lora_shrink(a, x, k, g->rows, 3, t, stride, j); break;
        case 2: lora_shrink(a, x, k, g->rows, 2, t, stride, j); break;
        default: lora_shrink(a, x, k, g->rows, 1, t, stride, j); break;
        }
    }
}

static void lora_expand_rows(const Lora *table, const LoraGroup *groups, int n_groups,
                             const float *t, int stride, float *y, int n) {
    if (lora_ranks(table, groups, n_groups) == 0)
        return;
    int chunks = (n + LORA_COLS - 1) / LORA_COLS;
#pragma omp for schedule(static)
    for (int c = 0; c < chunks; c++) {
        int c0 = c * LORA_COLS, c1 = n - c0 < LORA_COLS ? n : c0 + LORA_COLS;
        for (int gi = 0; gi < n_groups; gi++) {
            const LoraGroup *g = groups + gi;
            const Lora *d = table + g->slot;
            for (int p = 0; p < d->parts; p++) {
                const int *span = d->spans + 4 * p;
                int lo = span[2] > c0 ? span[2] : c0, hi = span[3] < c1 ? span[3] : c1;
                if (lo >= hi)
                    continue;
                switch (g->n) {
                case 4: lora_expand(d->bt, n, lo, hi - lo, span[0], span[1], t, stride,
                                    g->rows, 4, y); break;
                case 3: lora_expand(d->bt, n, lo, hi - lo, span[0], span[1], t, stride,
                                    g->rows, 3, y); break;
                case 2: lora_expand(d->bt, n, lo, hi - lo, span[0], span[1], t, stride,
                                    g->rows, 2, y); break;
                default: lora_expand(d->bt, n, lo, hi - lo, span[0], span[1], t, stride,
                                     g->rows, 1, y); break;
                }
            }
        }
    }
}

/* A step's time by phase, for benchmarks (cpu_backend.py --phases): while on, the team's
 * first thread adds each phase's wall time from the barrier that ends the phase before
 * it to the one that ends it (so a thread waiting at a barrier counts in the phase). Off,
 * each phase costs one predictable branch. LoRA's products count in their matmul's
 * phase; the final norm (and the gather of the rows that want logits) in PH_NORM. */
enum { PH_NORM, PH_QKV, PH_ROPE, PH_ATTEND, PH_O, PH_GATE_UP, PH_ACT, PH_DOWN, PH_EXPERTS,
       PH_HEAD, PHASES };
static int timing;
static double phase_ns[PHASES];

void time_phases(int on) { timing = on; }
int phase_count(void) { return PHASES; }

/* Nanoseconds in each phase since the last call, then zero. */
void phase_times(double *out) {
    for (int i = 0; i < PHASES; i++) {
        out[i] = phase_ns[i];
        phase_ns[i] = 0.0;
    }
}

static inline void phase_end(int phase, double *since) {
    if (!timing || omp_get_thread_num() != 0)
        return;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    double now = (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
    if (phase >= 0)
        phase_ns[phase] += now - *since;
    *since = now;
}

/* x [m, hidden]: the embedded tokens in, the last hidden state (before the final norm)
 * out. pos and line: each row's position and KV line. Rows may share a line: every row's
 * K/V is stored before any row attends, so the rows of one prompt at positions 0..n-1 are
 * its prefill, and k rows of one line at p..p+k-1 a speculation's verify pass.
 * block_table [lines, table_width]: with the block layout (md->block_size > 0), each
 * sequence's blocks, ``line`` then a row's sequence in it; NULL otherwise. Native code
 * trusts it: native.py checks every entry and position first.
 * row_slot: each row's adapter slot (0: the base model), or NULL (every row's base).
 * logits [n_out, vocab]: of rows out_rows[0..n_out) (each row, in order, when NULL);
 * n_out 0: no logits (a draft's step that only fills its KV).
 * aux_out [m, n_aux, hidden]: each row's hidden state entering layers aux_layers[0..n_aux)
 * (EAGLE3's features: vLLM's aux_hidden_states), or NULL with n_aux 0. */
void decode_step(const Model *md, float *x, int m, const long *pos, const long *line,
                 const long *block_table, int table_width, const int *row_slot,
                 const long *out_rows, int n_out, float *scratch, float *logits,
                 const int *aux_layers, int n_aux, float *aux_out) {
    int hidden = md->hidden, inter = md->intermediate, q_size = md->heads * md->head_dim;
    float *h = scratch, *picked = h + (long)m * hidden, *qkv = picked + (long)m * hidden;
    float *att = qkv + (long)m * qkv_width(md);
    float *gu = att + (long)m * q_size, *act = gu + 2L * m * widest_mlp(md);
    float *moe = act + (long)m * widest_mlp(md);
    int rt = md->lora_rank;  /* LoRA: x . A^T of each row, rt wide */
    float *t = scratch + step_floats(md, m);
    LoraGroup *groups = (LoraGroup *)(t + (long)m * rt);
    int n_groups = 0;  /* LoRA groups of rows; 0: nothing to add */
    int lora = row_slot != NULL && md->lora_slots > 0;
    int prompts = by_prompts(md, pos, line, m);
#pragma omp parallel
    {
        double since = 0.0;  /* the last phase's end (timing) */
        phase_end(-1, &since);
        if (lora) {
#pragma omp single
            n_groups = lora_groups(md, row_slot, m, groups);
        }
        for (int i = 0; i < md->layers; i++) {
            const Layer *ly = md->layer + i;
            for (int a = 0; a < n_aux; a++) {
                if (aux_layers[a] != i)
                    continue;
#pragma omp for schedule(static)
                for (int r = 0; r < m; r++)
                    memcpy(aux_out + ((long)r * n_aux + a) * hidden, x + (long)r * hidden,
                           hidden * sizeof(float));
            }
            rms_norm_rows(x, ly->ln1, h, m, hidden, md->eps);
            phase_end(PH_NORM, &since);
            lora_shrink_rows(ly->lora_qkv, groups, n_groups, h, hidden, t, rt);
            matmul_team(h, ly->qkv, qkv, m, 0);
            lora_expand_rows(ly->lora_qkv, groups, n_groups, t, rt, qkv, ly->qkv->n);
            phase_end(PH_QKV, &since);
            rotate_and_store(md, ly, qkv, m, pos, line, block_table, table_width);
            phase_end(PH_ROPE, &since);
            attend(md, ly, qkv, att, m, pos, line, block_table, table_width, prompts);
            phase_end(PH_ATTEND, &since);
            lora_shrink_rows(ly->lora_o, groups, n_groups, att, q_size, t, rt);
            matmul_team(att, ly->o, x, m, 1);
            lora_expand_rows(ly->lora_o, groups, n_groups, t, rt, x, hidden);
            phase_end(PH_O, &since);
            rms_norm_rows(x, ly->ln2, h, m, hidden, md->eps);
            phase_end(PH_NORM, &since);
            if (ly->router != NULL) {  /* experts take no LoRA (llama.py) */
                experts(md, ly, h, x, m, moe, gu, act, picked);
                phase_end(PH_EXPERTS, &since);
                continue;
            }
            lora_shrink_rows(ly->lora_gate_up, groups, n_groups, h, hidden, t, rt);
            matmul_team(h, ly->gate_up, gu, m, 0);
            lora_expand_rows(ly->lora_gate_up, groups, n_groups, t, rt, gu, 2 * inter);
            phase_end(PH_GATE_UP, &since);
            silu_times_up(gu, act, m, inter);
            phase_end(PH_ACT, &since);
            lora_shrink_rows(ly->lora_down, groups, n_groups, act, inter, t, rt);
            matmul_team(act, ly->down, x, m, 1);
            lora_expand_rows(ly->lora_down, groups, n_groups, t, rt, x, hidden);
            phase_end(PH_DOWN, &since);
        }
        if (out_rows != NULL) {  /* gather the rows that need logits */
#pragma omp for schedule(static)
            for (int r = 0; r < n_out; r++)
                memcpy(picked + (long)r * hidden, x + out_rows[r] * hidden,
                       hidden * sizeof(float));
        }
        const float *last = out_rows != NULL ? picked : x;
        rms_norm_rows(last, md->norm, h, n_out, hidden, md->eps);
        phase_end(PH_NORM, &since);
        matmul_team(h, md->lm_head, logits, n_out, 0);
        phase_end(PH_HEAD, &since);
    }
}
