// The portable build of the CPU micro-kernels (the compiler's baseline instruction set).
#define LORA_NS generic
#define LORA_W 4
#define LORA_F16C 0
#include "lora_delta_kernels.inc"
