// What every cache does with its heads' key codecs, whichever storage it has.
#include "methods/key_codec.h"

#include <exception>

namespace veloxquant {

void train_key_codecs(const std::vector<std::unique_ptr<KeyCodec>>& codecs, const float* keys,
                      int n_tokens) {
    const int heads = static_cast<int>(codecs.size());
    // Heads train independently (each codec's k-means has its own seed), so in parallel; the
    // k-means' own parallel loops then run inside one thread each. An exception may not leave
    // an OpenMP region (it would terminate the process): each head's is kept, and the lowest
    // head's rethrown.
    std::vector<std::exception_ptr> failed(heads);
#pragma omp parallel for schedule(dynamic)
    for (int h = 0; h < heads; ++h) {
        try {
            if (codecs[h]->needs_training())
                codecs[h]->train(keys + static_cast<std::size_t>(h) * n_tokens * codecs[h]->dim(),
                                 n_tokens);
        } catch (...) {
            failed[h] = std::current_exception();
        }
    }
    for (const std::exception_ptr& e : failed)
        if (e) std::rethrow_exception(e);
}

}  // namespace veloxquant
