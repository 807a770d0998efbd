// The portable build of the CPU micro-kernels (the compiler's baseline instruction set).
#define LORA_NS generic
#include "lora_delta_kernels.inc"
