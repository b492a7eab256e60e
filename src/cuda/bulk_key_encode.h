// Key encoders of long appends that a codec may have beside its one-thread and team encoders
// (codec_kernels.cuh, team_encode.cuh): kernels that encode many tokens of one unit together
// (a tiled product, codebooks staged once for a CTA's tokens), bit for bit the same codes.
// A codec opts in by specializing BulkKeyEncoder (qjl_encode.cuh, vecinfer_encode.cuh, ...):
//   template <> struct BulkKeyEncoder<XDevice> {
//     static constexpr bool kAvailable = true;
//     // Optional (false where absent): whether short appends (at most kTeamEncodeMaxItems
//     // items: a decode step's) come here too, where the values have their warp encoder, rather
//     // than to the team encoder (ShortAppends<>).
//     static constexpr bool kShortAppends = true;
//     // Whether the kernel handles a head of these parameters on a device that allows a CTA
//     // smem_optin bytes of shared memory (else the other encoders do).
//     static bool usable(const XDevice::Params&, size_t smem_optin);
//     // The kernel launch() takes for these parameters (for its attributes).
//     static const void* kernel(const XDevice::Params&);
//     // Key codes and scalars of every (unit, token) item of `a`, on `stream`.
//     static void launch(const EncodeParams<XDevice>& a, const XDevice::Params& any_head,
//                        int sms, cudaStream_t stream);
//   };
#pragma once

#include <cstddef>
#include <type_traits>

namespace veloxquant::cuda::codec {

template <class Codec>
struct BulkKeyEncoder {
    static constexpr bool kAvailable = false;
};

template <class Encoder, class = void>
struct ShortAppends : std::false_type {};
template <class Encoder>
struct ShortAppends<Encoder, std::void_t<decltype(Encoder::kShortAppends)>>
    : std::bool_constant<Encoder::kShortAppends> {};

}  // namespace veloxquant::cuda::codec
