// numpy arrays owned by C++ buffers, shared by the binding files of veloxquant._core.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstddef>
#include <cstring>
#include <vector>

namespace veloxquant::bind {

namespace nb = nanobind;

template <typename T>
using Numpy = nb::ndarray<nb::numpy, T>;

/// A new numpy array that owns a zero-initialised C++ buffer.
template <typename T>
Numpy<T> new_array(const std::vector<size_t>& shape) {
    size_t n = 1;
    for (size_t s : shape) n *= s;
    T* data = new T[n > 0 ? n : 1]();
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return Numpy<T>(data, shape.size(), shape.data(), owner);
}

/// Copies n elements into a new numpy array of the given shape.
template <typename T>
Numpy<T> copy_array(const T* src, const std::vector<size_t>& shape) {
    Numpy<T> out = new_array<T>(shape);
    if (out.size() > 0) std::memcpy(out.data(), src, out.size() * sizeof(T));
    return out;
}

}  // namespace veloxquant::bind
