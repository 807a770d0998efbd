// The AVX2 + FMA build of the CPU micro-kernels (compiled with -mavx2 -mfma; chosen at run time when the CPU has both).
#define LORA_NS avx2
#include "lora_delta_kernels.inc"
