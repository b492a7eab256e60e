// What every cache does with its heads' key codecs, whichever storage it has.
#include "methods/key_codec.h"

#include "core/parallel_errors.h"

namespace veloxquant {

void train_key_codecs(const std::vector<std::unique_ptr<KeyCodec>>& codecs, const float* keys,
                      int n_tokens) {
    std::vector<KeyCodec*> held;
    for (const auto& codec : codecs) held.push_back(codec.get());
    train_key_codecs(held, keys, n_tokens);
}

void train_key_codecs(const std::vector<KeyCodec*>& codecs, const float* keys, int n_tokens) {
    const int heads = static_cast<int>(codecs.size());
    // Heads train independently (each codec's k-means has its own seed), so in parallel; the
    // k-means' own parallel loops then run inside one thread each.
    ParallelErrors errors;
#pragma omp parallel for schedule(dynamic)
    for (int h = 0; h < heads; ++h) {
        errors.run(h, [&] {
            if (codecs[h]->needs_training())
                codecs[h]->train(keys + static_cast<std::size_t>(h) * n_tokens * codecs[h]->dim(),
                                 n_tokens);
        });
    }
    errors.rethrow();
}

}  // namespace veloxquant
