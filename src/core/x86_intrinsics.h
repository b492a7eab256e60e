// <immintrin.h> for the x86 kernels (VQ_X86_KERNELS, core/cpu_isa.h). GCC 12 reports that its
// own AVX-512 casts and reductions read an uninitialized __Y: the header builds a register's
// unused half from an undefined vector on purpose (GCC bug 105593, fixed in GCC 13). Every
// kernel file got dozens of these, about 200 a build, which hid any real warning; they are
// silenced for the header's lines only, so a use of an uninitialized variable in our code still
// warns.
#pragma once

#include "core/cpu_isa.h"

#ifdef VQ_X86_KERNELS
#if defined(__clang__)  // no such false warning, and no -Wmaybe-uninitialized to name
#include <immintrin.h>
#else
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#endif
