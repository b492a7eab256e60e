// The generic device path's launchers: one CodecBackend per device codec type, holding the
// codecs' parameters on the device, and the split plan of the attention.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/affine_state_device.cuh"
#include "cuda/bulk_key_encode.h"
#include "cuda/codec_attention.cuh"
#include "cuda/codec_cache.h"
#include "cuda/codec_prefill.cuh"
#include "cuda/codec_split.h"
#include "cuda/commvq_encode.cuh"
#include "cuda/cuda_cache.h"
#include "cuda/launch_scratch.h"
#include "cuda/programmatic_launch.h"
#include "cuda/qjl_encode.cuh"
#include "cuda/rabitq_encode.cuh"
#include "cuda/runtime_facts.h"
#include "cuda/side_stream.h"
#include "cuda/spectral_encode.cuh"
#include "cuda/team_encoders.cuh"
#include "cuda/team_search_encoders.cuh"
#include "cuda/team_spectral_rabitq_encoders.cuh"
#include "cuda/value_encode.cuh"
#include "cuda/vecinfer_encode.cuh"
#include "device_codecs/commvq_device.h"
#include "device_codecs/fp16_device.h"
#include "device_codecs/polarquant_device.h"
#include "device_codecs/qjl_device.h"
#include "device_codecs/rabitq_device.h"
#include "device_codecs/spectral_device.h"
#include "device_codecs/tq_device.h"
#include "device_codecs/vecinfer_device.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"
#include "veloxquant/caches.h"

namespace veloxquant::cuda {

static_assert(codec::kPage == kTokensPerPage, "device pages hold the CPU's tokens per page");
static_assert(KeyCenter::kMaxHeadDim <= 2 * 32 * codec::kCenterPairsPerLane,
              "an attention warp's lanes cover a centred head's pairs");

namespace {

using codec::AttentionParams;
using codec::EncodeParams;
using codec::HeadRegions;

unsigned blocks_for(long long items) {
    return static_cast<unsigned>((items + codec::kThreads - 1) / codec::kThreads);
}

// Long appends (more than kTeamEncodeMaxItems items) encode their keys with the codec's
// BulkKeyEncoder where it has one that takes every head (qjl, vecinfer, spectral, commvq, rabitq:
// bulk_key_encode.h) and their values one warp per token (value_encode.cuh: fp16 and Hadamard
// values); what is left (the keys of the other codecs, values under a dense rotation) takes the
// kernels below, chosen by the figures measured before the bulk encoders.
//
// Codecs whose long appends encode through shared memory (codec_encode_staged_kernel). On the
// H200 at 32K tokens x 8 heads (bench_codec_cache, both kernels for every codec): fp16 3.10 ->
// 1.48 ms (before its team encoder), qjl 37.5 -> 9.6, spectral 21.6 -> 12.2; turboquant and
// ratequant within 8% either way; the others lost up to 2x (vecinfer 8.4 -> 18.9, commvq 17.3 ->
// 35.7, polarquant 2.91 -> 3.12): at 64 items per CTA the staging's shared memory leaves fewer
// threads, and less L1 for the local arrays of their searches.
template <class Codec>
constexpr bool kStagedEncode =
    std::is_same_v<Codec, dev::QjlDevice> || std::is_same_v<Codec, dev::SpectralDevice>;

// Key codecs whose team encoder (team_encode.cuh) also beats the one-thread encoder on long
// appends, so that every append of theirs takes it. On the H200 at 32K tokens x 8 heads, d = 128
// (bench_codec_cache, against a build with every append on the teams): fp16 1.47 -> 0.49 ms,
// turboquant k4v4 4.15 -> 2.58, k1v2 2.94 -> 2.47, ratequant 2.91 -> 2.47, rabitq 43.5 -> 25.3;
// but qjl 11.0 -> 35.1, polarquant 2.84 -> 3.68, vecinfer 8.1 -> 38.0, spectral 12.1 -> 23.8
// and commvq 17.2 -> 143, whose long appends stay on one thread per item (their teams idle
// most threads in the ordered sums and the per-warp searches).
template <class Codec>
constexpr bool kTeamEncodesLongAppends =
    std::is_same_v<Codec, dev::Fp16Device> || std::is_same_v<Codec, dev::TqDevice> ||
    std::is_same_v<Codec, dev::RaBitQDevice>;

// The key codecs that take centred keys (KVCacheConfig::validate refuses center_keys for the
// calibrated commvq, vecinfer and spectral) at the head widths the device centre takes: only they
// have centred attention kernels.
template <class Codec, int D>
constexpr bool kCentredKernels =
    D <= KeyCenter::kMaxHeadDim &&
    !(std::is_same_v<Codec, dev::CommVQDevice> || std::is_same_v<Codec, dev::VecInferDevice> ||
      std::is_same_v<Codec, dev::SpectralDevice>);

// Codecs whose decode steps and short chunks (codec_attention_kernel, up to 8 rows a CTA) score
// on tensor cores; the others' features cost more to decode than lane scores there (9417ff6,
// H200: turboquant k4v4 0.092 -> 0.158 ms a decode step at 32K) and serve the wide prefill.
template <class Codec>
constexpr bool kFewRowFeatures =
    std::is_same_v<Codec, dev::Fp16Device> || std::is_same_v<Codec, dev::QjlDevice>;

// From 64 rows a KV head (the group's heads x queries) a launch takes the wide prefill kernel
// (codec_prefill.cuh) where every head has the feature form and head_dim <= 128.
constexpr int kWidePrefillRows = 64;

// The most distinct queries (consecutive limits) among `rows` consecutive rows, `group` rows a
// query: what a CTA's sliding-window span depends on (TokenWindow::span_bound).
constexpr int block_queries(int rows, int group) {
    return (rows - 1 + group - 1) / group + 1;
}

template <class Codec>
class Backend final : public CodecBackend {
public:
    Backend(const std::vector<const KeyCodec*>& keys,
            const std::vector<std::unique_ptr<ValueCodec>>& values, const PageLayout& layout)
        : heads_(static_cast<int>(keys.size())),
          d_(keys.at(0)->dim()),
          page_bytes_(layout.page_bytes) {
        dev::ParamArena arena;
        std::vector<typename Codec::Params> kp;
        std::vector<dev::ValueDevice::Params> vp;
        std::vector<HeadRegions> regions;
        for (int h = 0; h < heads_; ++h) {
            kp.push_back(Codec::build(*keys[h], arena));
            vp.push_back(dev::ValueDevice::build(*values[h], arena));
            const HeadLayout& hl = layout.heads[h];
            if (static_cast<std::size_t>(Codec::code_bytes(kp.back())) != hl.key_code_bytes ||
                Codec::num_scalars(kp.back()) != hl.key_scalars)
                throw std::logic_error(
                    "CUDA codec backend: device codec layout differs from the CPU's");
            if constexpr (team::TeamEncoder<Codec>::kAvailable)
                if (Codec::code_bytes(kp.back()) > team::TeamEncoder<Codec>::kMaxCodeBytes ||
                    dev::ValueDevice::code_bytes(vp.back()) >
                        team::TeamEncoder<dev::ValueDevice>::kMaxCodeBytes)
                    throw std::logic_error(
                        "CUDA codec backend: a token's code exceeds its team encoder's stream");
            state_stride_ = std::max(state_stride_, Codec::state_floats(kp.back()));
            if constexpr (codec::FeatureScore<Codec>::kAvailable) {  // the heads' common mode
                const codec::FeatureMode m = codec::FeatureScore<Codec>::mode(kp.back());
                if (kFewRowFeatures<Codec>)
                    feature_mode_ = h == 0 || m == feature_mode_ ? m : codec::kLaneScores;
                wide_prefill_ = (h == 0 || wide_prefill_) && m != codec::kLaneScores;
            }
            HeadRegions r;
            r.key_codes = static_cast<uint32_t>(hl.key_codes_offset);
            r.key_scalars = static_cast<uint32_t>(hl.key_scalars_offset);
            r.value_codes = static_cast<uint32_t>(hl.value_codes_offset);
            r.value_scalars = static_cast<uint32_t>(hl.value_scalars_offset);
            r.key_code_bytes = static_cast<uint32_t>(hl.key_code_bytes);
            r.value_code_bytes = static_cast<uint32_t>(hl.value_code_bytes);
            regions.push_back(r);
            // Staged rows: lane-per-token reads at an odd number of words; fp16 keys and values
            // as ldmatrix reads them in place.
            const int key_bytes = static_cast<int>(hl.key_code_bytes);
            stage_key_stride_ =
                std::max(stage_key_stride_, codec::InPlaceFeatures<Codec>::value
                                                ? codec::half_rows_stride(key_bytes, true)
                                                : codec::stage_stride(key_bytes));
            stage_value_stride_ = std::max(
                stage_value_stride_, codec::half_rows_stride(static_cast<int>(hl.value_code_bytes),
                                                             vp.back().bits == 16));
            key_table_floats_ = std::max(key_table_floats_, dev::table_floats_of<Codec>(kp.back()));
            value_table_floats_ =
                std::max(value_table_floats_, codec::value_table_floats(vp.back().bits));
            stage_key_scalars_ = std::max(stage_key_scalars_, hl.key_scalars);
            stage_value_scalars_ = std::max(stage_value_scalars_, hl.value_scalars);
        }
        warp_values_ = std::all_of(vp.begin(), vp.end(), codec::warp_encodes_values);
        if constexpr (codec::BulkKeyEncoder<Codec>::kAvailable) {
            const std::size_t optin = shared_memory_optin();
            bulk_keys_ = std::all_of(kp.begin(), kp.end(), [&](const typename Codec::Params& p) {
                return codec::BulkKeyEncoder<Codec>::usable(p, optin);
            });
            if (bulk_keys_) bulk_key_params_ = kp[0];  // for its shapes (pointers not yet rebased)
        }
        if (state_stride_ > dev::kMaxStateFloats)
            throw std::invalid_argument("CUDA codec backend: query state too large");
        state_stride_ = (state_stride_ + 3) / 4 * 4;
        if constexpr (kStagedEncode<Codec>) {
            for (const HeadLayout& hl : layout.heads)
                encode_code_stride_ =
                    std::max(encode_code_stride_, codec::stage_stride(static_cast<int>(std::max(
                                                      hl.key_code_bytes, hl.value_code_bytes))));
            encode_smem_ = codec::encode_smem_bytes(d_, encode_code_stride_);
            if (encode_smem_ > shared_memory_optin())
                encode_smem_ = 0;  // (sm_75 at head_dim 256) the one-thread encoder instead
            else
                check_cuda(cudaFuncSetAttribute(codec::codec_encode_staged_kernel<Codec>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(encode_smem_)),
                           "encode shared memory");
        }
        // One allocation: the arena, then the per-head parameter arrays.
        const std::size_t arena_bytes = (arena.bytes().size() + 255) / 256 * 256;
        const std::size_t kp_bytes = (kp.size() * sizeof(kp[0]) + 255) / 256 * 256;
        const std::size_t vp_bytes = (vp.size() * sizeof(vp[0]) + 255) / 256 * 256;
        params_bytes_ = arena_bytes + kp_bytes + vp_bytes + regions.size() * sizeof(HeadRegions);
        check_cuda(cudaMalloc(&params_, params_bytes_), "cudaMalloc(codec parameters)");
        auto* base = static_cast<uint8_t*>(params_);
        for (auto& p : kp) p.rebase(base);
        for (auto& p : vp) p.rebase(base);
        const auto copy = [](void* dst, const void* src, std::size_t n) {
            if (n > 0)
                check_cuda(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice),
                           "upload codec parameters");
        };
        copy(base, arena.bytes().data(), arena.bytes().size());
        copy(base + arena_bytes, kp.data(), kp.size() * sizeof(kp[0]));
        copy(base + arena_bytes + kp_bytes, vp.data(), vp.size() * sizeof(vp[0]));
        copy(base + arena_bytes + kp_bytes + vp_bytes, regions.data(),
             regions.size() * sizeof(HeadRegions));
        store_.keys = reinterpret_cast<const typename Codec::Params*>(base + arena_bytes);
        {  // The affine form of the query state, measured on the uploaded parameters.
            std::vector<int> state_floats;
            for (const auto& p : kp) state_floats.push_back(Codec::state_floats(p));
            AffineStateHost affine;
            if (measure_affine_state_on_device<Codec>(store_.keys, state_floats, d_, state_stride_,
                                                      dev::kMaxAffineFloats, affine))
                upload_affine(affine);
        }
        store_.values =
            reinterpret_cast<const dev::ValueDevice::Params*>(base + arena_bytes + kp_bytes);
        store_.regions =
            reinterpret_cast<const HeadRegions*>(base + arena_bytes + kp_bytes + vp_bytes);
        store_.page_bytes = page_bytes_;
        store_.heads = heads_;
        store_.d = d_;
        int device = 0;
        check_cuda(cudaGetDevice(&device), "cudaGetDevice");
        check_cuda(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device),
                   "SM count");
        max_smem_ = std::min(kMaxSmem, shared_memory_optin());
    }

    ~Backend() override {
        cudaFree(params_);
        cudaFree(affine_);
    }

    void encode(const SequenceSet& at, int n, const float* keys, const float* values,
                cudaStream_t stream) override {
        if (n == 0) return;
        EncodeParams<Codec> a{{with(at.pool, at.page_table)}, at.size, n, keys, values};
        a.units = heads_ * at.batch;
        a.pools = at.pools;
        a.starts = at.sizes;
        a.store.kin = at.kin.views;
        const long long items = static_cast<long long>(a.units) * n;
        if constexpr (team::TeamEncoder<Codec>::kAvailable)
            if (items <= kTeamEncodeMaxItems &&
                !(codec::ShortAppends<codec::BulkKeyEncoder<Codec>>::value && bulk_keys_ &&
                  warp_values_))
                return launch_team_encode(a, items, stream);
        // Long appends (and short ones where the bulk encoder takes them): the values one warp
        // per token where they have them, on the side stream, beside the keys on `stream` (by the
        // codec's bulk encoder, bulk_key_encode.h, or the kernels below).
        if (!warp_values_) return encode_keys(a, items, stream);
        codec::launch_encode_values(codec::ValueUnits::of(a), sms_, side_.fork(stream));
        a.values = nullptr;
        encode_keys(a, items, stream);
        side_.join(stream);
    }

    /// The keys of `a`, and its values where a.values is not null, on `stream`.
    void encode_keys(EncodeParams<Codec> a, long long items, cudaStream_t stream) {
        if constexpr (codec::BulkKeyEncoder<Codec>::kAvailable)
            if (bulk_keys_) {
                codec::BulkKeyEncoder<Codec>::launch(a, bulk_key_params_, sms_, stream);
                a.keys = nullptr;
            }
        if (a.keys == nullptr && a.values == nullptr) return;
        if constexpr (kTeamEncodesLongAppends<Codec>) {
            launch_team_encode(a, items, stream);
        } else {
            if constexpr (kStagedEncode<Codec>)
                if (encode_smem_ > 0) {
                    codec::codec_encode_staged_kernel<Codec>
                        <<<static_cast<unsigned>((items + codec::kEncodeItems - 1) /
                                                 codec::kEncodeItems),
                           codec::kEncodeItems, encode_smem_, stream>>>(a, encode_code_stride_);
                    return check_cuda(cudaGetLastError(), "codec encode kernel");
                }
            codec::codec_encode_kernel<Codec><<<blocks_for(items), codec::kThreads, 0, stream>>>(a);
        }
        check_cuda(cudaGetLastError(), "codec encode kernel");
    }

    void dequantize(const uint8_t* pool, const int32_t* page_table, int start, int n, float* keys,
                    float* values, cudaStream_t stream) const override {
        if (n == 0) return;
        EncodeParams<Codec> a{
            {with(const_cast<uint8_t*>(pool), page_table)}, start, n, nullptr, nullptr};
        a.units = heads_;
        codec::codec_dequantize_kernel<Codec>
            <<<blocks_for(static_cast<long long>(heads_) * n), codec::kThreads, 0, stream>>>(
                a, keys, values);
        check_cuda(cudaGetLastError(), "codec dequantize kernel");
    }

    void attend(const SequenceSet& source, const float* queries, int group, int n_queries,
                float* out, float scale, bool causal, cudaStream_t stream) override {
        const ScratchRelease release(workspace_, stream);  // a long chunk's partial states
        if (d_ <= 64)
            return attend_d<64>(source, queries, group, n_queries, out, scale, causal, stream);
        if (d_ <= 128)
            return attend_d<128>(source, queries, group, n_queries, out, scale, causal, stream);
        return attend_d<256>(source, queries, group, n_queries, out, scale, causal, stream);
    }

    std::size_t nbytes() const override {
        return params_bytes_ + affine_bytes_ + workspace_.nbytes();
    }

    std::size_t encode_stack_bytes() const override {  // the kernels encode() picks from
        std::size_t most = 0;
        auto take = [&](const void* kernel) {
            cudaFuncAttributes attr{};
            check_cuda(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes(encode)");
            most = std::max(most, attr.localSizeBytes);
        };
        if constexpr (team::TeamEncoder<Codec>::kAvailable)
            take(reinterpret_cast<const void*>(&codec::codec_team_encode_kernel<Codec>));
        if constexpr (codec::BulkKeyEncoder<Codec>::kAvailable)
            if (bulk_keys_) take(codec::BulkKeyEncoder<Codec>::kernel(bulk_key_params_));
        if (warp_values_) take(codec::encode_values_kernel_for(d_));
        if constexpr (!kTeamEncodesLongAppends<Codec>) {
            bool staged = false;
            if constexpr (kStagedEncode<Codec>) {
                staged = encode_smem_ > 0;
                if (staged)
                    take(reinterpret_cast<const void*>(&codec::codec_encode_staged_kernel<Codec>));
            }
            if (!staged) take(reinterpret_cast<const void*>(&codec::codec_encode_kernel<Codec>));
        }
        return most;
    }

    CodecParamsView params_view() const override {
        CodecParamsView v;
        v.keys = store_.keys;
        v.values = store_.values;
        v.affine = affine_state_;
        v.state_stride = state_stride_;
        v.key_table_floats = key_table_floats_;
        v.value_table_floats = value_table_floats_;
        v.feature_mode = feature_mode_;
        return v;
    }

private:
    static void launch_team_encode(const EncodeParams<Codec>& a, long long items,
                                   cudaStream_t stream) {
        codec::codec_team_encode_kernel<Codec>
            <<<static_cast<unsigned>(items), team::kTeam, 0, stream>>>(a);
        check_cuda(cudaGetLastError(), "codec team encode kernel");
    }

    void upload_affine(const AffineStateHost& f) {
        const std::size_t c_bytes = (f.constant.size() * sizeof(float) + 255) / 256 * 256;
        const std::size_t r_bytes = (f.row_of.size() * sizeof(int) + 255) / 256 * 256;
        affine_bytes_ = c_bytes + r_bytes + f.matrix.size() * sizeof(float);
        check_cuda(cudaMalloc(&affine_, affine_bytes_), "cudaMalloc(affine query state)");
        auto* base = static_cast<uint8_t*>(affine_);
        check_cuda(cudaMemcpy(base, f.constant.data(), f.constant.size() * sizeof(float),
                              cudaMemcpyHostToDevice),
                   "affine");
        check_cuda(cudaMemcpy(base + c_bytes, f.row_of.data(), f.row_of.size() * sizeof(int),
                              cudaMemcpyHostToDevice),
                   "affine");
        check_cuda(cudaMemcpy(base + c_bytes + r_bytes, f.matrix.data(),
                              f.matrix.size() * sizeof(float), cudaMemcpyHostToDevice),
                   "affine");
        affine_state_.constant = reinterpret_cast<const float*>(base);
        affine_state_.row_of = reinterpret_cast<const int*>(base + c_bytes);
        affine_state_.matrix = reinterpret_cast<const float*>(base + c_bytes + r_bytes);
        affine_state_.varying = std::max(f.varying, 1);
        affine_state_.stride = state_stride_;
    }

    codec::Store<Codec> with(uint8_t* pool, const int32_t* page_table) const {
        codec::Store<Codec> s = store_;
        s.pool = pool;
        s.page_table = page_table;
        return s;
    }

    template <int D>
    void attend_d(const SequenceSet& source, const float* queries, int group, int n_queries,
                  float* out, float scale, bool causal, cudaStream_t stream) {
        AttentionParams<Codec> a;
        a.store = with(source.pool, source.page_table);
        a.size = source.size;
        a.units = heads_ * source.batch;
        a.pools = source.pools;
        a.sizes = source.sizes;
        a.window = source.window;
        a.page_tables = source.page_tables;
        a.outliers = source.outliers;
        // The tokens the splits walk: every one, or a sliding window's span of held pages (a
        // batch's longest span, which the longest sequence need not have), at most a CTA's
        // span_bound (each CTA walks from its own first row's window).
        const int span =
            source.span > 0
                ? source.span
                : source.size - a.window.gap(causal ? source.size - n_queries + 1 : source.size);
        a.n_queries = n_queries;
        a.group = group;
        a.rows = group * n_queries;
        a.causal = causal ? 1 : 0;
        a.scale_log2 = scale * 1.4426950408889634f;
        a.queries = queries;
        a.out = out;
        const KinParams& kin = source.kin;  // views: each sequence's codecs, sized by the largest
        a.store.kin = kin.views;
        a.state_stride = kin.views != nullptr ? kin.state_stride : state_stride_;
        if (source.center.damped != nullptr) {  // W after the codec's state (CenterParams)
            if (!kCentredKernels<Codec, D>)
                throw std::logic_error("CUDA codec backend: no centred-key kernels here");
            a.center = source.center;
            a.center.offset = a.state_stride;
            a.state_stride += CenterParams::floats(a.center.pairs);
        }
        a.stage_key_stride = stage_key_stride_;
        a.stage_value_stride = stage_value_stride_;
        a.stage_key_scalars = stage_key_scalars_;
        a.stage_value_scalars = stage_value_scalars_;
        a.key_table_floats = kin.views != nullptr ? kin.key_table_floats : key_table_floats_;
        const int value_tables =
            kin.views != nullptr ? kin.value_table_floats : value_table_floats_;
        a.table_floats = codec::tables_floats(a.key_table_floats, value_tables);
        if constexpr (codec::FeatureScore<Codec>::kAvailable && D <= 128)
            if (wide_prefill_ && kin.views == nullptr && a.rows >= kWidePrefillRows)
                if (attend_wide<D>(a, span, stream)) return;
        // Rows per CTA (R): 8 for a prefill chunk or wide groups, 4 for a decode step of grouped
        // heads, 1 for one row; fewer where the rows' states do not fit in shared memory.
        // Tensor-core scores (FeatureScore) where their tiles fit beside the largest R.
        const auto smem_of = [&](int r) {
            return codec::attention_layout<Codec>(r, D, a.stage_sizes(), codec::kWarps).total;
        };
        const auto fits = [&](int r) { return smem_of(r) <= max_smem_; };
        a.feature_scores = codec::kLaneScores;
        const int R = a.rows > 4 && fits(8) ? 8 : a.rows > 1 && fits(4) ? 4 : 1;
        if (!fits(R))
            throw std::invalid_argument(
                "CUDA codec backend: codes or query state too large for shared memory");
        a.feature_scores = kin.views != nullptr ? kin.feature_mode : feature_mode_;
        if (!fits(R)) a.feature_scores = codec::kLaneScores;
        a.rows_per_block = std::min(R, a.rows);
        const int row_blocks = (a.rows + a.rows_per_block - 1) / a.rows_per_block;
        // Splits of whole passes of the CTA's warps (kWarps * 32 tokens), planned for waves of
        // as many CTAs as the kernel keeps on an SM at once (the occupancy API: 4 for most
        // decode kernels, 3 for fp16's 17 KB of staged codes a warp and for qjl's tensor-core
        // scores; codec_split.h).
        const std::size_t smem = smem_of(R);
        const bool centred = a.center.damped != nullptr;
        const int resident = R == 8   ? resident_ctas<D, 8>(a.feature_scores, centred, smem)
                             : R == 4 ? resident_ctas<D, 4>(a.feature_scores, centred, smem)
                                      : resident_ctas<D, 1>(a.feature_scores, centred, smem);
        const long long units = static_cast<long long>(a.units) * row_blocks;
        constexpr int kChunk = codec::kWarps * 32;
        const int size = a.window.span_bound(block_queries(a.rows_per_block, group), span);
        const int chunks = std::max(1, (size + kChunk - 1) / kChunk);
        const long long wave = static_cast<long long>(resident) * sms_;
        const CodecSplit plan = plan_codec_split(units, chunks, wave);
        a.tokens_per_split = plan.chunks_per_split * kChunk;
        a.splits = plan.splits;
        bind_workspace<D>(a, stream);
        prepare(a, kin.views != nullptr ? kin.affine : affine_ != nullptr, stream);
        const dim3 grid(a.splits, a.units, row_blocks);
        if (R == 8)
            launch_attention<D, 8>(a, grid, smem, stream);
        else if (R == 4)
            launch_attention<D, 4>(a, grid, smem, stream);
        else
            launch_attention<D, 1>(a, grid, smem, stream);
        merge<D>(a, stream);
    }

    /// The workspace of a launch: its rows' states, then their splits' (max, sum) and sums.
    template <int D>
    void bind_workspace(AttentionParams<Codec>& a, cudaStream_t stream) {
        const std::size_t rows_total = static_cast<std::size_t>(a.units) * a.rows;
        const std::size_t states_bytes =
            (rows_total * a.state_stride * sizeof(float) + 255) / 256 * 256;
        const std::size_t ml_bytes = (rows_total * a.splits * sizeof(float2) + 255) / 256 * 256;
        const std::size_t o_bytes = rows_total * a.splits * D * sizeof(float);
        auto* ws = static_cast<uint8_t*>(
            workspace_.get(states_bytes + ml_bytes + o_bytes, stream, "codec attention workspace"));
        a.states = reinterpret_cast<float*>(ws);
        a.partial_ml = reinterpret_cast<float2*>(ws + states_bytes);
        a.partial_o = reinterpret_cast<float*>(ws + states_bytes + ml_bytes);
    }

    /// The rows' query states (the affine form's GEMV where the codecs have one).
    void prepare(const AttentionParams<Codec>& a, bool affine, cudaStream_t stream) {
        const std::size_t rows_total = static_cast<std::size_t>(a.units) * a.rows;
        if (affine)
            codec::codec_affine_prepare_kernel<Codec>
                <<<dim3(static_cast<unsigned>(rows_total), (a.state_stride + 31) / 32),
                   codec::kStateWarps * 32, 0, stream>>>(a, affine_state_);
        else
            codec::codec_prepare_kernel<Codec>
                <<<blocks_for(rows_total), codec::kThreads, 0, stream>>>(a);
        check_cuda(cudaGetLastError(), "codec prepare kernel");
    }

    template <int D>
    void merge(const AttentionParams<Codec>& a, cudaStream_t stream) {
        auto* kernel = &codec::codec_merge_kernel<Codec, D>;
        check_cuda(launch_after_prerequisite(kernel, dim3(static_cast<unsigned>(a.units * a.rows)),
                                             dim3(codec::kMergeWarps * 32), 0, stream,
                                             merge_waits<D>(), a),
                   "codec merge kernel");
    }

    /// A launch of many rows on the wide prefill kernel (codec_prefill.cuh): 128 rows a CTA,
    /// splits of whole pages planned as codec_attention_kernel's. False (nothing launched) where
    /// its shared memory does not fit.
    template <int D>
    bool attend_wide(AttentionParams<Codec>& a, int span, cudaStream_t stream) {
        const bool centred = a.center.damped != nullptr;
        const std::size_t smem =
            codec::prefill_layout(D, a.stage_sizes(), !codec::FeatureScore<Codec>::kExactHalves)
                .total;
        if (smem > max_smem_) return false;
        auto* kernel = &codec::codec_prefill_kernel<Codec, D, false>;
        if constexpr (kCentredKernels<Codec, D>)
            if (centred) kernel = &codec::codec_prefill_kernel<Codec, D, true>;
        int resident = 1;
        bool waits = false;
        check_cuda(cuda::resident_ctas(kernel, codec::kPrefillWarps * 32, smem, resident),
                   "codec prefill occupancy");
        check_cuda(waits_for_prerequisite(kernel, waits), "codec prefill code");
        const int row_blocks = (a.rows + codec::kPrefillRows - 1) / codec::kPrefillRows;
        const int size = a.window.span_bound(block_queries(codec::kPrefillRows, a.group), span);
        const int pages = std::max(1, (size + codec::kPage - 1) / codec::kPage);
        const CodecSplit plan =
            plan_codec_split(static_cast<long long>(a.units) * row_blocks, pages,
                             std::max(resident, 1) * static_cast<long long>(sms_));
        a.tokens_per_split = plan.chunks_per_split * codec::kPage;
        a.splits = plan.splits;
        a.rows_per_block = codec::kPrefillRows;
        bind_workspace<D>(a, stream);
        prepare(a, affine_ != nullptr, stream);
        check_cuda(
            launch_after_prerequisite(kernel, dim3(a.splits, a.units, row_blocks),
                                      dim3(codec::kPrefillWarps * 32), smem, stream, waits, a),
            "codec prefill kernel");
        merge<D>(a, stream);
        return true;
    }

    /// The attention kernel of (D, R, FeatureMode, centred keys) as a function pointer.
    template <int D, int R, bool CENTRED>
    static auto kernel_of(int mode) {
        // One kernel per score path (each holds only its own registers).
        auto* kernel = &codec::codec_attention_kernel<Codec, D, R, codec::kLaneScores, CENTRED>;
        if constexpr (codec::FeatureScore<Codec>::kAvailable && kFewRowFeatures<Codec>) {
            if (mode == codec::kFeatureTile)
                kernel = &codec::codec_attention_kernel<Codec, D, R, codec::kFeatureTile, CENTRED>;
            if constexpr (codec::InPlaceFeatures<Codec>::value)
                if (mode == codec::kFeaturesInPlace)
                    kernel = &codec::codec_attention_kernel<Codec, D, R, codec::kFeaturesInPlace,
                                                            CENTRED>;
        }
        return kernel;
    }

    template <int D, int R>
    auto& facts(int mode, bool centred) {
        return kernel_facts_[centred ? 1 : 0][D / 128][R / 4][mode];  // D in {64, 128, 256}
    }

    /// The attention kernel of (D, R, FeatureMode, centred keys), its dynamic shared memory
    /// allowed up to max_smem_ (once). The kernels of centred keys are their own, so that the
    /// others keep their registers (the bias's code in every kernel took 20 more in a third of
    /// them, past 128 in some decode kernels).
    template <int D, int R>
    auto attention_kernel(int mode, bool centred) {
        auto* kernel = kernel_of<D, R, false>(mode);
        if constexpr (kCentredKernels<Codec, D>)
            if (centred) kernel = kernel_of<D, R, true>(mode);
        KernelFacts& k = facts<D, R>(mode, centred);
        if (!k.raised) {
            check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(max_smem_)),
                       "codec attention shared memory");
            check_cuda(kernel_waits_for_prerequisite(kernel, k.waits), "codec attention code");
            k.raised = true;
        }
        return kernel;
    }

    /// Whether the merge kernel of width D waits for the attention (built for sm_90).
    template <int D>
    bool merge_waits() {
        int& waits = merge_waits_[D / 128];
        if (waits < 0) {
            bool w = false;
            check_cuda(kernel_waits_for_prerequisite(&codec::codec_merge_kernel<Codec, D>, w),
                       "codec merge code");
            waits = w ? 1 : 0;
        }
        return waits == 1;
    }

    /// CTAs of that kernel an SM holds at once with `smem` bytes each (at least 1).
    template <int D, int R>
    int resident_ctas(int mode, bool centred, std::size_t smem) {
        auto* kernel = attention_kernel<D, R>(mode, centred);
        KernelFacts& k = facts<D, R>(mode, centred);
        if (k.smem != smem) {
            int ctas = 0;
            check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel,
                                                                     codec::kWarps * 32, smem),
                       "codec attention occupancy");
            k.smem = smem;
            k.resident = std::max(ctas, 1);
        }
        return k.resident;
    }

    template <int D, int R>
    void launch_attention(const AttentionParams<Codec>& a, dim3 grid, std::size_t smem,
                          cudaStream_t stream) {
        // A programmatic dependent of the prepare kernel where its code waits for the states
        // (sm_90): it launches as that kernel's CTAs end, its set-up before their writes land.
        const bool centred = a.center.damped != nullptr;
        auto* kernel = attention_kernel<D, R>(a.feature_scores, centred);
        const bool waits = facts<D, R>(a.feature_scores, centred).waits;
        check_cuda(launch_after_prerequisite(kernel, grid, dim3(codec::kWarps * 32), smem, stream,
                                             waits, a),
                   "codec attention kernel");
    }

    /// The current device's shared memory per block, opted in (runtime_facts.h).
    static std::size_t shared_memory_optin() {
        std::size_t bytes = 0;
        check_cuda(cuda::shared_memory_optin(bytes), "shared memory per block");
        return bytes;
    }

    static constexpr std::size_t kMaxSmem = 200 * 1024;  ///< an attention CTA's shared memory
    std::size_t max_smem_ = kMaxSmem;  ///< kMaxSmem, or less where the device allows less

    int heads_, d_;
    uint64_t page_bytes_;
    int state_stride_ = 1;
    codec::FeatureMode feature_mode_ = codec::kLaneScores;  ///< the scores every head allows
    int stage_key_stride_ = 0, stage_value_stride_ = 0;     ///< staged bytes per token
    int stage_key_scalars_ = 0, stage_value_scalars_ = 0;   ///< staged scalars per token
    int key_table_floats_ = 0, value_table_floats_ = 0;     ///< codec tables in shared memory
    int encode_code_stride_ = 0;                            ///< staged code bytes per encode item
    std::size_t encode_smem_ = 0;  ///< codec_encode_staged_kernel's smem (0: not taken)
    /// Per attention kernel (centred keys, D, R, FeatureMode): max_smem_ allowed, whether its code
    /// waits for the prepare kernel (launched as its programmatic dependent), and the CTAs an SM
    /// holds at `smem` bytes each.
    struct KernelFacts {
        bool raised = false;
        bool waits = false;
        std::size_t smem = 0;
        int resident = 1;
    };
    KernelFacts kernel_facts_[2][3][3][3];  ///< [centred][D / 128][R / 4][FeatureMode]
    bool wide_prefill_ = false;             ///< every head has the feature form (wide prefill)
    int merge_waits_[3] = {-1, -1, -1};     ///< per D: merge_waits (-1: not asked yet)
    int sms_ = 1;
    bool warp_values_ = false;  ///< long appends' values by codec::encode_values_kernel
    bool bulk_keys_ = false;    ///< long appends' keys by codec::BulkKeyEncoder<Codec>
    SideStream side_;           ///< where long appends' values encode (warp_values_)
    typename Codec::Params bulk_key_params_{};  ///< head 0's, for the bulk encoder's shapes
    void* params_ = nullptr;
    std::size_t params_bytes_ = 0;
    void* affine_ = nullptr;  ///< the affine query state's arrays
    std::size_t affine_bytes_ = 0;
    AffineState affine_state_;  ///< constant null: no affine form (codec_prepare_kernel)
    LaunchScratch workspace_;   ///< attend's query states and partial states
    codec::Store<Codec> store_;
};

}  // namespace

std::unique_ptr<CodecBackend> make_codec_backend(
    const std::string& method, const std::vector<const KeyCodec*>& keys,
    const std::vector<std::unique_ptr<ValueCodec>>& values, const PageLayout& layout) {
    if (keys.empty() || keys.size() != values.size() || layout.heads.size() != keys.size())
        throw std::invalid_argument("CUDA codec backend: one key and value codec per head");
    if (method == "turboquant_rvq" || method == "ratequant")
        return std::make_unique<Backend<dev::TqDevice>>(keys, values, layout);
    if (method == "commvq")
        return std::make_unique<Backend<dev::CommVQDevice>>(keys, values, layout);
    if (method == "fp16") return std::make_unique<Backend<dev::Fp16Device>>(keys, values, layout);
    if (method == "qjl") return std::make_unique<Backend<dev::QjlDevice>>(keys, values, layout);
    if (method == "polarquant")
        return std::make_unique<Backend<dev::PolarQuantDevice>>(keys, values, layout);
    if (method == "rabitq")
        return std::make_unique<Backend<dev::RaBitQDevice>>(keys, values, layout);
    if (method == "spectral")
        return std::make_unique<Backend<dev::SpectralDevice>>(keys, values, layout);
    if (method == "vecinfer")
        return std::make_unique<Backend<dev::VecInferDevice>>(keys, values, layout);
    throw std::invalid_argument("CUDA codec backend: no device codec for method '" + method + "'");
}

}  // namespace veloxquant::cuda
