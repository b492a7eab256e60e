#include "cuda/device_outliers.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/cuda_cache.h"  // check_cuda
#include "cuda/outlier_records.cuh"
#include "veloxquant/observer.h"

namespace veloxquant::cuda {

namespace {

/// norms[i] = ||keys[i]|| of items rows of d floats, as key_norm: squares summed in double in
/// coordinate order (no contraction), the root rounded to float.
__global__ void key_norms_kernel(const float* keys, long long items, int d, float* norms) {
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= items) return;
    const float* k = keys + i * d;
    double s = 0.0;
    for (int j = 0; j < d; ++j) {
        const double x = k[j];
        s = __dadd_rn(s, __dmul_rn(x, x));
    }
    norms[i] = __double2float_rn(__dsqrt_rn(s));
}

/// picked[i] = (key row, value row) of row index rows[i] of keys and values [rows][d].
__global__ void gather_rows_kernel(const float* keys, const float* values, const int32_t* rows,
                                   int m, int d, float* picked) {
    const int i = blockIdx.x;
    if (i >= m) return;
    const std::size_t src = static_cast<std::size_t>(rows[i]) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        picked[(2 * static_cast<std::size_t>(i)) * d + j] = keys[src + j];
        picked[(2 * static_cast<std::size_t>(i) + 1) * d + j] = values[src + j];
    }
}

/// items[i] = (head, entry, token row t): keys/values [heads][n][d] row (head, t) = the entry's
/// vectors.
__global__ void restore_rows_kernel(OutlierView v, const int3* items, int n, int d, float* keys,
                                    float* values) {
    const int3 it = items[blockIdx.x];
    const uint8_t* rec =
        v.records + (static_cast<std::size_t>(it.x) * v.capacity + it.y) * 2 * v.vector_bytes;
    const std::size_t dst = (static_cast<std::size_t>(it.x) * n + it.z) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        keys[dst + j] = outlier_coordinate(rec, v.bits, d, j);
        values[dst + j] = outlier_coordinate(rec + v.vector_bytes, v.bits, d, j);
    }
}

}  // namespace

DeviceOutlierStore::DeviceOutlierStore(int num_heads, int head_dim, int bits, int max_tokens)
    : num_heads_(num_heads),
      head_dim_(head_dim),
      max_tokens_(max_tokens),
      mask_words_((max_tokens + 31) / 32),
      host_(num_heads, head_dim, bits),
      record_bytes_(2 * host_.vector_bytes()) {
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&counts_), num_heads * sizeof(int32_t)),
               "cudaMalloc(outlier counts)");
    check_cuda(cudaMemset(counts_, 0, num_heads * sizeof(int32_t)), "outlier counts");
}

DeviceOutlierStore::~DeviceOutlierStore() {
    cudaFree(records_);
    cudaFree(positions_);
    cudaFree(counts_);
    cudaFree(mask_);
    cudaFree(norms_);
    cudaFreeHost(norms_host_);
}

void DeviceOutlierStore::measure(const float* keys, int n, cudaStream_t stream) {
    const std::size_t items = static_cast<std::size_t>(num_heads_) * n;
    if (items > norms_capacity_) {  // (no copy of the old buffers is in flight: add synchronized)
        cudaFree(norms_);
        cudaFreeHost(norms_host_);
        norms_ = nullptr;
        norms_host_ = nullptr;
        norms_capacity_ = 0;
        check_cuda(cudaMalloc(reinterpret_cast<void**>(&norms_), items * sizeof(float)),
                   "cudaMalloc(outlier key norms)");
        check_cuda(cudaMallocHost(reinterpret_cast<void**>(&norms_host_), items * sizeof(float)),
                   "cudaMallocHost(outlier key norms)");
        norms_capacity_ = items;
    }
    key_norms_kernel<<<static_cast<unsigned>((items + 255) / 256), 256, 0, stream>>>(
        keys, static_cast<long long>(items), head_dim_, norms_);
    check_cuda(cudaGetLastError(), "outliers: key norms kernel");
    check_cuda(
        cudaMemcpyAsync(norms_host_, norms_, items * sizeof(float), cudaMemcpyDeviceToHost, stream),
        "outliers: copy key norms");
    measured_ = n;
}

void DeviceOutlierStore::add(KeyNormObserver& observer, int layer, const float* keys,
                             const float* values, int n, int first, cudaStream_t stream) {
    if (measured_ != n) throw std::logic_error("outliers: add without the measure of its keys");
    measured_ = -1;
    std::vector<uint8_t> flags(static_cast<std::size_t>(num_heads_) * n);
    observer.observe_and_flag_heads(layer, num_heads_, norms_host_, n, flags.data());
    std::vector<int32_t> rows;  // head * n + token of each flagged token, head by head
    for (int r = 0; r < num_heads_ * n; ++r)
        if (flags[r]) rows.push_back(r);
    if (rows.empty()) return;
    // The flagged tokens to the host, where the CPU's encoder makes their records.
    const int m = static_cast<int>(rows.size()), d = head_dim_;
    std::vector<float> picked(2 * static_cast<std::size_t>(m) * d);
    int32_t* rows_dev = nullptr;
    float* picked_dev = nullptr;
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&rows_dev), m * sizeof(int32_t), stream),
               "outliers: rows");
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&picked_dev), picked.size() * sizeof(float),
                               stream),
               "outliers: picked tokens");
    check_cuda(
        cudaMemcpyAsync(rows_dev, rows.data(), m * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
        "outliers: rows");
    gather_rows_kernel<<<m, 128, 0, stream>>>(keys, values, rows_dev, m, d, picked_dev);
    check_cuda(cudaGetLastError(), "outliers: gather kernel");
    check_cuda(cudaMemcpyAsync(picked.data(), picked_dev, picked.size() * sizeof(float),
                               cudaMemcpyDeviceToHost, stream),
               "outliers: copy picked tokens");
    check_cuda(cudaFreeAsync(rows_dev, stream), "outliers: rows");
    check_cuda(cudaFreeAsync(picked_dev, stream), "outliers: picked tokens");
    check_cuda(cudaStreamSynchronize(stream), "outliers: synchronize for picked tokens");
    std::vector<int> from(num_heads_);
    for (int h = 0; h < num_heads_; ++h) from[h] = host_.count(h);
    for (int i = 0; i < m; ++i) {
        const float* kv = picked.data() + 2 * static_cast<std::size_t>(i) * d;
        host_.add(rows[i] / n, first + rows[i] % n, kv, kv + d);
    }
    int most = 0;
    for (int h = 0; h < num_heads_; ++h) most = std::max(most, host_.count(h));
    if (most > capacity_) {
        grow(std::max({most, 2 * capacity_, 16}), stream);
    } else {
        for (int h = 0; h < num_heads_; ++h) upload_entries(h, from[h], stream);
        upload_counts(stream);
    }
    upload_mask(first / 32, (first + n + 31) / 32, stream);
}

void DeviceOutlierStore::upload_entries(int head, int from, cudaStream_t stream) {
    const int count = host_.count(head);
    if (count <= from) return;
    const std::size_t at = static_cast<std::size_t>(head) * capacity_ + from;
    check_cuda(cudaMemcpyAsync(records_ + at * record_bytes_,
                               host_.records(head).data() + from * record_bytes_,
                               (count - from) * record_bytes_, cudaMemcpyHostToDevice, stream),
               "outliers: upload records");
    check_cuda(cudaMemcpyAsync(positions_ + at, host_.positions(head).data() + from,
                               (count - from) * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
               "outliers: upload positions");
}

void DeviceOutlierStore::upload_counts(cudaStream_t stream) {
    std::vector<int32_t> counts(num_heads_);
    for (int h = 0; h < num_heads_; ++h) counts[h] = host_.count(h);
    check_cuda(cudaMemcpyAsync(counts_, counts.data(), num_heads_ * sizeof(int32_t),
                               cudaMemcpyHostToDevice, stream),
               "outliers: upload counts");
}

void DeviceOutlierStore::grow(int capacity, cudaStream_t stream) {
    uint8_t* records = nullptr;
    int32_t* positions = nullptr;
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&records),
                          static_cast<std::size_t>(num_heads_) * capacity * record_bytes_),
               "cudaMalloc(outlier records)");
    if (cudaMalloc(reinterpret_cast<void**>(&positions),
                   static_cast<std::size_t>(num_heads_) * capacity * sizeof(int32_t)) !=
        cudaSuccess) {
        cudaFree(records);
        throw std::runtime_error("cudaMalloc(outlier positions) failed");
    }
    // The old arrays may still be read by kernels on other streams: wait for the device.
    check_cuda(cudaDeviceSynchronize(), "outliers: synchronize before growing");
    cudaFree(records_);
    cudaFree(positions_);
    records_ = records;
    positions_ = positions;
    capacity_ = capacity;
    for (int h = 0; h < num_heads_; ++h) upload_entries(h, 0, stream);
    upload_counts(stream);
}

void DeviceOutlierStore::upload_mask(int w0, int w1, cudaStream_t stream) {
    w1 = std::min(w1, mask_words_);
    if (w0 >= w1) return;
    if (mask_ == nullptr) {
        const std::size_t bytes = static_cast<std::size_t>(num_heads_) * mask_words_ * 4;
        check_cuda(cudaMalloc(reinterpret_cast<void**>(&mask_), bytes), "cudaMalloc(outlier mask)");
        check_cuda(cudaMemset(mask_, 0, bytes), "outlier mask");
        mask_host_.assign(static_cast<std::size_t>(num_heads_) * mask_words_, 0u);
    }
    for (int h = 0; h < num_heads_; ++h) {
        uint32_t* words = mask_host_.data() + static_cast<std::size_t>(h) * mask_words_;
        std::fill(words + w0, words + w1, 0u);
        const auto& pos = host_.positions(h);
        for (auto it = std::lower_bound(pos.begin(), pos.end(), 32 * w0);
             it != pos.end() && *it < 32 * w1; ++it)
            words[*it / 32] |= 1u << (*it % 32);
    }
    check_cuda(
        cudaMemcpy2DAsync(mask_ + w0, mask_words_ * 4, mask_host_.data() + w0, mask_words_ * 4,
                          (w1 - w0) * 4, num_heads_, cudaMemcpyHostToDevice, stream),
        "outliers: upload mask");
}

namespace {
/// The word past the last position any head holds (0: none).
int end_word(const OutlierStore& s) {
    int last = -1;
    for (int h = 0; h < s.num_heads(); ++h)
        if (s.count(h) > 0) last = std::max(last, s.positions(h).back());
    return (last + 32) / 32;
}
}  // namespace

void DeviceOutlierStore::truncate(int n_tokens) {
    // Kernels on any stream may still read the entries being dropped.
    check_cuda(cudaDeviceSynchronize(), "outliers: synchronize before truncating");
    const int w1 = end_word(host_);
    host_.truncate(n_tokens);
    upload_counts(nullptr);
    upload_mask(std::max(n_tokens, 0) / 32, w1, nullptr);
    check_cuda(cudaStreamSynchronize(nullptr), "outliers: truncate");
}

void DeviceOutlierStore::erase_range(int begin, int end, cudaStream_t stream) {
    const int w1 = std::min(end_word(host_), (std::max(end, 0) + 31) / 32);
    std::vector<int> from(num_heads_);
    for (int h = 0; h < num_heads_; ++h) {
        const auto& pos = host_.positions(h);
        from[h] = static_cast<int>(std::lower_bound(pos.begin(), pos.end(), begin) - pos.begin());
    }
    host_.erase_range(begin, end);
    for (int h = 0; h < num_heads_; ++h) upload_entries(h, from[h], stream);
    upload_counts(stream);
    upload_mask(std::max(begin, 0) / 32, w1, stream);
}

void DeviceOutlierStore::clear() {
    truncate(0);
}

void DeviceOutlierStore::assign(const OutlierStore& entries) {
    if (entries.bits() != host_.bits() || entries.num_heads() != num_heads_ ||
        entries.dim() != head_dim_)
        throw std::invalid_argument("outlier store: entries of other bits or shape");
    for (int h = 0; h < num_heads_; ++h)
        if (entries.count(h) > 0 && entries.positions(h).back() >= max_tokens_)
            throw std::invalid_argument("outlier store: an entry past max_seq_len");
    clear();  // (synchronizes the device)
    host_ = entries;
    int most = 0;
    for (int h = 0; h < num_heads_; ++h) most = std::max(most, host_.count(h));
    if (most > capacity_)
        grow(most, nullptr);
    else
        for (int h = 0; h < num_heads_; ++h) upload_entries(h, 0, nullptr);
    upload_counts(nullptr);
    upload_mask(0, end_word(host_), nullptr);
    check_cuda(cudaStreamSynchronize(nullptr), "outliers: assign");
}

OutlierView DeviceOutlierStore::view() const {
    OutlierView v;
    if (host_.total() == 0) return v;
    v.records = records_;
    v.positions = positions_;
    v.counts = counts_;
    v.mask = mask_;
    v.capacity = capacity_;
    v.mask_words = mask_words_;
    v.bits = host_.bits();
    v.vector_bytes = static_cast<int>(host_.vector_bytes());
    return v;
}

void DeviceOutlierStore::restore(int start, int n, float* keys, float* values,
                                 cudaStream_t stream) const {
    std::vector<int3> items;  // (head, entry, token row)
    for (int h = 0; h < num_heads_; ++h) {
        const auto& pos = host_.positions(h);
        for (auto it = std::lower_bound(pos.begin(), pos.end(), start);
             it != pos.end() && *it < start + n; ++it)
            items.push_back(make_int3(h, static_cast<int>(it - pos.begin()), *it - start));
    }
    if (items.empty()) return;
    int3* items_dev = nullptr;
    check_cuda(
        cudaMallocAsync(reinterpret_cast<void**>(&items_dev), items.size() * sizeof(int3), stream),
        "outliers: restore items");
    check_cuda(cudaMemcpyAsync(items_dev, items.data(), items.size() * sizeof(int3),
                               cudaMemcpyHostToDevice, stream),
               "outliers: restore items");
    restore_rows_kernel<<<static_cast<unsigned>(items.size()), 128, 0, stream>>>(
        view(), items_dev, n, head_dim_, keys, values);
    check_cuda(cudaGetLastError(), "outliers: restore kernel");
    check_cuda(cudaFreeAsync(items_dev, stream), "outliers: restore items");
}

std::size_t DeviceOutlierStore::nbytes() const {
    return static_cast<std::size_t>(num_heads_) *
           (capacity_ * (record_bytes_ + sizeof(int32_t)) + sizeof(int32_t) +
            (mask_ != nullptr ? mask_words_ * sizeof(uint32_t) : 0));
}

}  // namespace veloxquant::cuda
