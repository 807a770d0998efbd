// The AVX2 + FMA + F16C build of the CPU micro-kernels (compiled with -mavx2 -mfma -mf16c; chosen at run time when
// the CPU has all three).
#define LORA_NS avx2
#define LORA_F16C 1
#include "lora_delta_kernels.inc"
