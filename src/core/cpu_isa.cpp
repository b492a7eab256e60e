#include "core/cpu_isa.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#ifdef VQ_X86_KERNELS
#include <cpuid.h>
#endif

namespace veloxquant {
namespace {

struct IsaEntry {
    const char* name;
    CpuIsa isa;
};

// What this CPU (and OS) support, best first; generic always last.
const std::vector<IsaEntry>& available() {
    static const std::vector<IsaEntry> sets = [] {
        std::vector<IsaEntry> v;
#ifdef VQ_X86_KERNELS
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
            v.push_back({"avx512", CpuIsa::kAvx512});
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            v.push_back({"avx2", CpuIsa::kAvx2});
#endif
        v.push_back({"generic", CpuIsa::kGeneric});
        return v;
    }();
    return sets;
}

// The set in use, an index into available(): at first the environment's VQ_CPU_ISA where this
// CPU runs it (a name it does not run is reported once on stderr, and the best set used), else
// the best.
std::atomic<int>& selected() {
    static std::atomic<int> index{[] {
        const char* env = std::getenv("VQ_CPU_ISA");
        if (env == nullptr || *env == '\0') return 0;
        const auto& sets = available();
        for (std::size_t i = 0; i < sets.size(); ++i)
            if (sets[i].name == std::string(env)) return static_cast<int>(i);
        std::fprintf(stderr,
                     "veloxquant: VQ_CPU_ISA=%s is not a kernel set this CPU runs; using %s\n", env,
                     sets[0].name);
        return 0;
    }()};
    return index;
}

}  // namespace

std::vector<std::string> cpu_isas() {
    std::vector<std::string> names;
    for (const IsaEntry& e : available()) names.push_back(e.name);
    return names;
}

CpuIsa cpu_isa() {
    return available()[selected().load(std::memory_order_relaxed)].isa;
}

const char* cpu_isa_name() {
    return available()[selected().load(std::memory_order_relaxed)].name;
}

bool cpu_has_f16c() {
#ifdef VQ_X86_KERNELS
    // CPUID.1:ECX.F16C, where the OS saves AVX state (F16C is VEX-encoded). Not
    // __builtin_cpu_supports("f16c"), which clang 14 does not know.
    static const bool yes = [] {
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0 &&
               __builtin_cpu_supports("avx");
    }();
    return yes;
#else
    return false;
#endif
}

void use_cpu_isa(const std::string& name) {
    const auto& sets = available();
    for (std::size_t i = 0; i < sets.size(); ++i) {
        if (name.empty() || name == sets[i].name) {
            selected().store(static_cast<int>(i));
            return;
        }
    }
    throw std::invalid_argument("CPU kernel set '" + name + "' is not available on this CPU");
}

}  // namespace veloxquant
