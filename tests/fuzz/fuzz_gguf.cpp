// Fuzz target: GGUF files as a user might hand them to `veloxquant`. A file either throws
// std::runtime_error from GGUFFile::open, or opens, and then every metadata value reads as its
// type, every tensor row of a supported type dequantizes, the tokenizer keys give a vocabulary
// or a std::runtime_error / std::invalid_argument, and LlamaModel::load either refuses the file
// or gives a model that runs two tokens (or refuses the NaN or infinite keys its weights make).
// A crash or sanitizer report is a finding.
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "fuzz_input.h"
#include "model/dequant.h"
#include "model/gguf.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "veloxquant/veloxquant.h"

namespace {

using namespace veloxquant;

// Models wider than this (n_embd, n_ff or n_vocab) are loaded but not run.
constexpr int kMaxWidth = 4096;

// Every metadata value read as its type (an array as its element type). Only integer getters
// may throw here: a u64 above INT64_MAX, as documented.
void read_metadata(const GGUFFile& file) {
    for (const std::string& key : file.keys()) {
        const bool array = file.value_type(key) == GGUFValueType::ARRAY;
        switch (array ? file.array_type(key) : file.value_type(key)) {
            case GGUFValueType::STRING:
                array ? (void)file.get_string_array(key) : (void)file.get_string(key);
                break;
            case GGUFValueType::F32:
            case GGUFValueType::F64:
                array ? (void)file.get_float_array(key) : (void)file.get_float(key);
                break;
            case GGUFValueType::BOOL:
                if (!array) file.get_bool(key, false);  // (no getter for arrays of bools)
                break;
            case GGUFValueType::ARRAY:  // arrays of arrays: no getter
                break;
            default:
                try {
                    array ? (void)file.get_int_array(key) : (void)file.get_int(key);
                } catch (const std::runtime_error& e) {
                    vqfuzz::rejected(e);
                }
        }
    }
}

void dequantize_first_rows(const GGUFFile& file) {
    std::vector<float> row;
    for (const GGUFTensor& t : file.tensors()) {
        if (!ggml_can_dequantize(t.type) || t.cols() > kMaxWidth) continue;
        row.resize(static_cast<std::size_t>(t.cols()));
        dequantize_row(t.type, t.data, row.data(), t.cols());
        const std::size_t last =
            static_cast<std::size_t>(t.rows() - 1) * ggml_row_bytes(t.type, t.cols());
        dequantize_row(t.type, t.data + last, row.data(), t.cols());
    }
}

void tokenize(const GGUFFile& file) {
    BPETokenizer::Vocab vocab;
    try {
        vocab = vocab_from_gguf(file);
    } catch (const std::runtime_error& e) {
        vqfuzz::rejected(e);
        return;
    }
    try {
        const BPETokenizer tok(std::move(vocab));
        const std::vector<int32_t> ids = tok.encode("Hello world, <|im_start|> 12 \xc3\xa9\xff");
        tok.decode(ids);
    } catch (const std::invalid_argument& e) {
        vqfuzz::rejected(e);
    }
}

void run_model(const std::string& path) {
    std::unique_ptr<LlamaModel> model;
    try {
        model = LlamaModel::load(path);
    } catch (const std::runtime_error& e) {
        vqfuzz::rejected(e);
        return;
    }
    const LlamaHParams& hp = model->hparams();
    if (hp.n_embd > kMaxWidth || hp.n_ff > kMaxWidth || hp.n_vocab > kMaxWidth || hp.n_layer > 64)
        return;
    KVCacheConfig config;
    config.method = "turboquant_rvq";
    config.bits = 2;
    std::vector<std::unique_ptr<KVCache>> caches;
    try {
        caches = model->make_caches(config, 8);
    } catch (const std::invalid_argument&) {  // a head_dim the method cannot take
        config.method = "fp16";
        caches = model->make_caches(config, 8);
    }
    const int32_t tokens[2] = {0, hp.n_vocab - 1};
    std::vector<float> logits(static_cast<std::size_t>(2) * hp.n_vocab);
    try {
        model->forward(tokens, 2, caches, logits.data(), true);
    } catch (const std::invalid_argument& e) {  // weights that give NaN or infinite keys
        vqfuzz::rejected(e);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
    static const std::string path = vqfuzz::temp_path("model.gguf");
    write_file_atomic(path, std::string(reinterpret_cast<const char*>(data), size));
    std::unique_ptr<GGUFFile> file;
    try {
        file = GGUFFile::open(path);
    } catch (const std::runtime_error& e) {
        vqfuzz::rejected(e);
        return 0;
    }
    read_metadata(*file);
    dequantize_first_rows(*file);
    tokenize(*file);
    run_model(path);
    return 0;
}
