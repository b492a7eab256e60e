// Carrying exceptions out of OpenMP loops.
//
// An exception may not leave an OpenMP parallel region: the runtime calls std::terminate and the
// process ends, whatever handlers the caller has. Loops whose bodies can throw (a codec's checks,
// std::bad_alloc from any allocation) run each iteration's body through ParallelErrors::run and
// call rethrow() after the region. The exception kept is the lowest iteration's, so which error
// a caller sees does not depend on how the threads were scheduled.
#pragma once

#include <exception>
#include <mutex>
#include <utility>

namespace veloxquant {

class ParallelErrors {
public:
    /// Runs body(); an exception it throws is kept (the lowest index's wins), not propagated.
    template <class Body>
    void run(long long index, Body&& body) noexcept {
        try {
            body();
        } catch (...) {
            keep(index, std::current_exception());
        }
    }

    /// Rethrows the kept exception, if any; call it after the parallel region.
    void rethrow() const {
        if (error_) std::rethrow_exception(error_);
    }

private:
    void keep(long long index, std::exception_ptr e) noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_ || index < index_) {
            error_ = std::move(e);
            index_ = index;
        }
    }

    std::mutex mutex_;
    std::exception_ptr error_;
    long long index_ = 0;
};

}  // namespace veloxquant
