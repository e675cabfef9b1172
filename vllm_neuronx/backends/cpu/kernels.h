/* What the CPU backend's native kernels share (see kernels.py for how they build).
 *
 * The structs Python fills for decode_step.c (native.py) are declared once, here, as
 * field lists: the same lists give the C structs and the layout table (layout.c)
 * against which native.py checks its ctypes view when the library loads. */
#ifndef VLLM_NEURONX_KERNELS_H
#define VLLM_NEURONX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* The formats a packed weight's values come in (kernels.py: WEIGHT_KINDS). */
enum { WEIGHT_BF16 = 0, WEIGHT_INT8 = 1, WEIGHT_FP8 = 2 };

/* A [n, k] weight packed by PackedMatmul.pack_all: its values, and for int8 and fp8 the
 * scale of each of its n output columns (w = value * scale). */
#define WEIGHT_FIELDS(X)                                                                  \
    X(const void *, data)          /* [panels, k, PANEL] values */                        \
    X(const float *, scale)        /* [n], or NULL (bf16) */                              \
    X(int, kind)                   /* WEIGHT_* */                                         \
    X(int, n)                                                                             \
    X(int, k)

/* One LoRA adapter's delta on one fused matmul [n, k] (lora.py's LoraWeights):
 * y += (x . A^T) . B^T, the scaling folded into B. B is stored transposed, [rank, n],
 * so that the second product runs along contiguous output columns (vectors of them,
 * no horizontal sums). The fused matmuls stack parts (q|k|v, gate|up): each part the
 * adapter adapts owns a span of its ranks and of the output columns, and B is zero
 * outside those blocks, so only the blocks are read. rank 0 (a, bt NULL): the adapter
 * does not adapt this matmul. */
#define LORA_FIELDS(X)                                                                    \
    X(const float *, a)            /* [rank, k] fp32 */                                   \
    X(const float *, bt)           /* [rank, n] fp32 */                                   \
    X(const int *, spans)          /* [parts][4]: ranks [r0, r1), columns [c0, c1) */     \
    X(int, rank)                                                                          \
    X(int, parts)

/* One layer's tensors. LoRA: each fused matmul's deltas, one per adapter slot (slot 0,
 * the base model, always empty). */
#define LAYER_FIELDS(X)                                                                   \
    X(const float *, ln1)          /* [hidden] */                                         \
    X(const float *, ln2)                                                                 \
    X(const struct Weight *, qkv)                                                         \
    X(const struct Weight *, o)                                                           \
    X(const struct Weight *, gate_up)                                                     \
    X(const struct Weight *, down)                                                        \
    X(void *, k_cache)             /* [lines, kv_heads, max_len, head_dim] or [blocks, */ \
                                   /* block_size, kv_heads, head_dim]; fp32 or fp8 */     \
    X(void *, v_cache)                                                                    \
    X(const float *, qkv_bias)     /* [q + k + v widths], or NULL (Qwen2) */              \
    X(const float *, q_norm)       /* [head_dim] per-head RMSNorm weights, or NULL */     \
    X(const float *, k_norm)       /* (Qwen3) */                                          \
    X(const struct Weight *, router) /* [experts] columns; NULL in a dense layer */       \
    X(const struct Weight *, expert_gate_up) /* [experts] weights, or NULL */             \
    X(const struct Weight *, expert_down)                                                 \
    X(const struct Lora *, lora_qkv) /* [lora_slots] by adapter slot, or NULL (no LoRA) */ \
    X(const struct Lora *, lora_o)                                                        \
    X(const struct Lora *, lora_gate_up)                                                  \
    X(const struct Lora *, lora_down)

/* The model: its shape, then its tensors. */
#define MODEL_FIELDS(X)                                                                   \
    X(int, hidden) X(int, intermediate) X(int, heads) X(int, kv_heads) X(int, head_dim)   \
    X(int, layers) X(int, max_len) X(int, window) X(int, vocab)                           \
    X(int, experts) X(int, experts_per_token) X(int, norm_topk) X(int, expert_size)       \
    X(int, kv_fp8)                 /* the KV cache holds e4m3fn bytes, not fp32 */        \
    X(int, kv_bf16)                /* the KV cache holds bf16 (an fp32's top half) */     \
    X(int, block_size)             /* > 0: the block layout, through a block table; */    \
                                   /* 0: a line of max_len positions per sequence */      \
    X(int, lora_slots)             /* max_loras + 1 (0: no LoRA) */                       \
    X(int, lora_rank)              /* the widest fused rank a delta may have */           \
    X(float, eps) X(float, scale)                                                         \
    X(const float *, cos)          /* [max_len, head_dim] */                              \
    X(const float *, sin)                                                                 \
    X(const float *, norm)         /* [hidden] */                                         \
    X(const struct Weight *, lm_head)                                                     \
    X(const struct Layer *, layer) /* [layers] */

#define DECLARE_FIELD(type, name) type name;
typedef struct Weight { WEIGHT_FIELDS(DECLARE_FIELD) } Weight;
typedef struct Lora { LORA_FIELDS(DECLARE_FIELD) } Lora;
typedef struct Layer { LAYER_FIELDS(DECLARE_FIELD) } Layer;
typedef struct Model { MODEL_FIELDS(DECLARE_FIELD) } Model;
#undef DECLARE_FIELD

/* One field of a struct as the compiler laid it out. */
typedef struct {
    const char *name;
    long offset, size;
} FieldLayout;

void matmul_team(const float *restrict x, const Weight *w, float *restrict y, int m, int add);

/* e4m3fn of x: round to nearest even, saturated at +-448 (torch's cast of x clamped). */
uint8_t fp8_from_float(float x);
/* x rounded to bf16 (to nearest even; NaN to a quiet NaN), as torch rounds it. Inline, so
 * that a loop of them vectorizes (the KV write: a call per value took a b=32 step's
 * rotary-and-store phase to 1.45 ms). */
static inline uint16_t bf16_from_float(float x) {
    uint32_t bits;
    __builtin_memcpy(&bits, &x, sizeof bits);
    uint16_t rounded = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    return x != x ? 0x7FC0 : rounded;
}

/* The fields of "Weight", "Lora", "Layer" or "Model", ending with a NULL name; *size gets the
 * struct's. */
const FieldLayout *struct_layout(const char *which, long *size);

#endif
