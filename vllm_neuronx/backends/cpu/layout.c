/* The layout of kernels.h's structs, as this compiler made it (see kernels.h). */
#include <string.h>

#include "kernels.h"

#define WEIGHT_ENTRY(type, name) {#name, offsetof(Weight, name), sizeof(((Weight *)0)->name)},
#define LORA_ENTRY(type, name) {#name, offsetof(Lora, name), sizeof(((Lora *)0)->name)},
#define LAYER_ENTRY(type, name) {#name, offsetof(Layer, name), sizeof(((Layer *)0)->name)},
#define MODEL_ENTRY(type, name) {#name, offsetof(Model, name), sizeof(((Model *)0)->name)},

static const FieldLayout weight_layout[] = {WEIGHT_FIELDS(WEIGHT_ENTRY){NULL, 0, 0}};
static const FieldLayout lora_layout[] = {LORA_FIELDS(LORA_ENTRY){NULL, 0, 0}};
static const FieldLayout layer_layout[] = {LAYER_FIELDS(LAYER_ENTRY){NULL, 0, 0}};
static const FieldLayout model_layout[] = {MODEL_FIELDS(MODEL_ENTRY){NULL, 0, 0}};

const FieldLayout *struct_layout(const char *which, long *size) {
    if (strcmp(which, "Weight") == 0) {
        *size = sizeof(Weight);
        return weight_layout;
    }
    if (strcmp(which, "Lora") == 0) {
        *size = sizeof(Lora);
        return lora_layout;
    }
    if (strcmp(which, "Layer") == 0) {
        *size = sizeof(Layer);
        return layer_layout;
    }
    if (strcmp(which, "Model") == 0) {
        *size = sizeof(Model);
        return model_layout;
    }
    *size = 0;
    return NULL;
}
