// The SIMD instruction set the CPU kernels run (model/matmul.cpp, methods/value_codec.cpp).
// Each writes its kernel once and compiles it for baseline x86-64 ("generic": SSE2, or another
// architecture's baseline) and, on x86-64, also for AVX2 + FMA and for AVX-512 through the
// target attribute, never through -march; the best set the CPU supports is used unless the
// environment's VQ_CPU_ISA ("avx512", "avx2", "generic"), a test or a benchmark picks another.
#pragma once

#include <string>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define VQ_X86_KERNELS 1
#define VQ_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define VQ_TARGET_AVX512 __attribute__((target("avx512f,fma")))
// AVX2 with F16C (vcvtph2ps on 8 halves): every AVX2 CPU has it, but cpu_isas() does not check
// it, so a kernel built for it is chosen through kernel_for_isa_f16c.
#define VQ_TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#endif
// Kernel helpers inlined into each per-ISA entry point are compiled for that entry's target.
#define VQ_ALWAYS_INLINE inline __attribute__((always_inline))

namespace veloxquant {

enum class CpuIsa { kGeneric, kAvx2, kAvx512 };

/// The sets this CPU can run, best first: "avx512", "avx2" (x86-64 with FMA), "generic".
std::vector<std::string> cpu_isas();
/// The set in use (the best one unless VQ_CPU_ISA or use_cpu_isa chose another), and its name.
CpuIsa cpu_isa();
const char* cpu_isa_name();
/// Selects a set by name ("" = the best) for every CPU kernel; for tests and benchmarks. Throws
/// std::invalid_argument for a set the CPU cannot run.
void use_cpu_isa(const std::string& name);

/// Of a kernel's builds for each set, the one of the set in use (the avx2 and avx512 builds exist
/// where VQ_X86_KERNELS is defined; elsewhere a kernel has only its generic build).
template <typename Fn>
Fn kernel_for_isa(Fn generic, Fn avx2, Fn avx512) {
    switch (cpu_isa()) {
        case CpuIsa::kAvx512:
            return avx512;
        case CpuIsa::kAvx2:
            return avx2;
        case CpuIsa::kGeneric:
            break;
    }
    return generic;
}

/// Whether the CPU converts halves (F16C).
bool cpu_has_f16c();

/// kernel_for_isa where the avx2 build also needs F16C (VQ_TARGET_AVX2_F16C): the generic build
/// on an AVX2 CPU without it.
template <typename Fn>
Fn kernel_for_isa_f16c(Fn generic, Fn avx2, Fn avx512) {
    if (cpu_isa() == CpuIsa::kAvx2 && !cpu_has_f16c()) return generic;
    return kernel_for_isa(generic, avx2, avx512);
}

}  // namespace veloxquant

/// kernel_for_isa on x86-64; elsewhere the generic build (the avx2 and avx512 names need not
/// exist there).
#ifdef VQ_X86_KERNELS
#define VQ_KERNEL_FOR_ISA(generic, avx2, avx512) ::veloxquant::kernel_for_isa(generic, avx2, avx512)
#define VQ_KERNEL_FOR_ISA_F16C(generic, avx2, avx512) \
    ::veloxquant::kernel_for_isa_f16c(generic, avx2, avx512)
#else
#define VQ_KERNEL_FOR_ISA(generic, avx2, avx512) (generic)
#define VQ_KERNEL_FOR_ISA_F16C(generic, avx2, avx512) (generic)
#endif
