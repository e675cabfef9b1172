/* What the CPU backend's native kernels share (see kernels.py for how they build).
 *
 * The structs Python fills for decode_step.c (native.py) are declared once, here, as
 * field lists: the same lists give the C structs and the layout table (layout.c)
 * against which native.py checks its ctypes view when the library loads. */
#ifndef VLLM_NEURONX_KERNELS_H
#define VLLM_NEURONX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

void matmul_team(const float *restrict x, const uint16_t *restrict w, float *restrict y,
                 int m, int n, int k, int add);

/* One layer's tensors. */
#define LAYER_FIELDS(X)                                                                   \
    X(const float *, ln1)          /* [hidden] */                                         \
    X(const float *, ln2)                                                                 \
    X(const uint16_t *, qkv)       /* packed by Bf16Matmul.pack_all */                    \
    X(const uint16_t *, o)                                                                \
    X(const uint16_t *, gate_up)                                                          \
    X(const uint16_t *, down)                                                             \
    X(float *, k_cache)            /* [lines, kv_heads, max_len, head_dim] */             \
    X(float *, v_cache)                                                                   \
    X(const float *, qkv_bias)     /* [q + k + v widths], or NULL (Qwen2) */              \
    X(const float *, q_norm)       /* [head_dim] per-head RMSNorm weights, or NULL */     \
    X(const float *, k_norm)       /* (Qwen3) */                                          \
    X(const uint16_t *, router)    /* packed, [experts] columns; NULL in a dense layer */ \
    X(const uint16_t *const *, expert_gate_up) /* [experts] packed weights, or NULL */    \
    X(const uint16_t *const *, expert_down)

/* The model: its shape, then its tensors. */
#define MODEL_FIELDS(X)                                                                   \
    X(int, hidden) X(int, intermediate) X(int, heads) X(int, kv_heads) X(int, head_dim)   \
    X(int, layers) X(int, max_len) X(int, window) X(int, vocab)                           \
    X(int, experts) X(int, experts_per_token) X(int, norm_topk) X(int, expert_size)       \
    X(float, eps) X(float, scale)                                                         \
    X(const float *, cos)          /* [max_len, head_dim] */                              \
    X(const float *, sin)                                                                 \
    X(const float *, norm)         /* [hidden] */                                         \
    X(const uint16_t *, lm_head)   /* packed */                                           \
    X(const struct Layer *, layer) /* [layers] */

#define DECLARE_FIELD(type, name) type name;
typedef struct Layer { LAYER_FIELDS(DECLARE_FIELD) } Layer;
typedef struct Model { MODEL_FIELDS(DECLARE_FIELD) } Model;
#undef DECLARE_FIELD

/* One field of a struct as the compiler laid it out. */
typedef struct {
    const char *name;
    long offset, size;
} FieldLayout;

/* The fields of "Layer" or "Model", ending with a NULL name; *size gets the struct's. */
const FieldLayout *struct_layout(const char *which, long *size);

#endif
