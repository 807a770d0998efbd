// The AVX2 + FMA + F16C build of the CPU micro-kernels (compiled with -mavx2 -mfma -mf16c; chosen at run time when
// the CPU has all three).
#define LORA_NS avx2
#if defined(__F16C__)  // (not on other architectures, where build.sh compiles this file without x86 flags)
#define LORA_F16C 1
#else
#define LORA_F16C 0
#endif
#include "lora_delta_kernels.inc"
