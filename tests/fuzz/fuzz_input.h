// Helpers shared by the file-format fuzz targets (fuzz_*.cpp). Each target defines
// LLVMFuzzerTestOneInput; it is linked either with libFuzzer (scripts/fuzz.sh, clang) or with
// replay_main.cpp, which runs a checked-in corpus through it under ctest.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "core/binary_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size);

namespace vqfuzz {

/// A path of this process's own in the temp directory (the loaders read files, not buffers).
inline std::string temp_path(const char* stem) {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/vqfuzz_" +
           std::to_string(getpid()) + "_" + stem;
}

/// `data` as a file whose payload length (u64 at length_at) and CRC-32 (u32 at crc_at, over the
/// bytes from payload_at on) agree with its bytes, so that mutations reach the payload parser
/// instead of stopping at the checksum. Inputs shorter than the header are left as they are.
inline std::string with_valid_checksum(const uint8_t* data, std::size_t size, std::size_t length_at,
                                       std::size_t crc_at, std::size_t payload_at) {
    std::string bytes(reinterpret_cast<const char*>(data), size);
    if (size < payload_at) return bytes;
    const uint64_t length = size - payload_at;
    const uint32_t crc = veloxquant::crc32(bytes.data() + payload_at, length);
    std::memcpy(&bytes[length_at], &length, sizeof length);
    std::memcpy(&bytes[crc_at], &crc, sizeof crc);
    return bytes;
}

/// Deterministic values in [-2, 2) for the operations run on what a file loaded.
inline void fill(float* out, std::size_t n, uint32_t seed) {
    for (std::size_t i = 0; i < n; ++i) {
        seed = seed * 1664525u + 1013904223u;
        out[i] = static_cast<float>(seed >> 8) * (4.0f / 16777216.0f) - 2.0f;
    }
}

/// Prints why an input was rejected when VQFUZZ_VERBOSE is set (to triage a corpus).
inline void rejected(const std::exception& e) {
    static const bool verbose = std::getenv("VQFUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "  rejected: %s\n", e.what());
}

}  // namespace vqfuzz
