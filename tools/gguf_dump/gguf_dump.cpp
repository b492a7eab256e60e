// gguf_dump: prints what our GGUF reader sees, for cross-checking against gguf-py.
//
//   gguf_dump info FILE
//       JSON on stdout: version, alignment, data_offset, the metadata in file order (key, type,
//       element type for arrays, value; null for bool and nested arrays) and the tensor infos.
//   gguf_dump dequant FILE TENSOR OUT [ROW_BEGIN ROW_COUNT]
//       Writes rows [ROW_BEGIN, ROW_BEGIN + ROW_COUNT) of TENSOR (all rows by default),
//       dequantized, to OUT as little-endian float32.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "model/dequant.h"
#include "model/gguf.h"

namespace {

using veloxquant::GGUFFile;
using veloxquant::GGUFTensor;
using veloxquant::GGUFValueType;

void json_string(std::ostream& os, const std::string& s) {
    os << '"';
    for (const char c : s) {
        const auto u = static_cast<unsigned char>(c);
        if (c == '"' || c == '\\') {
            os << '\\' << c;
        } else if (u < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", u);
            os << buf;
        } else {
            os << c;  // UTF-8 passes through unchanged
        }
    }
    os << '"';
}

// Python's json module reads NaN / Infinity, which strict JSON lacks.
void json_number(std::ostream& os, double v) {
    if (std::isnan(v)) {
        os << "NaN";
    } else if (std::isinf(v)) {
        os << (v > 0 ? "Infinity" : "-Infinity");
    } else {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", v);
        os << buf;
    }
}

template <typename T, typename Print>
void print_list(std::ostream& os, const std::vector<T>& values, Print print) {
    os << '[';
    for (std::size_t i = 0; i < values.size(); ++i) {
        if (i > 0) os << ',';
        print(values[i]);
    }
    os << ']';
}

bool is_float(GGUFValueType t) {
    return t == GGUFValueType::F32 || t == GGUFValueType::F64;
}

void print_value(std::ostream& os, const GGUFFile& f, const std::string& key) {
    const GGUFValueType t = f.value_type(key);
    if (t == GGUFValueType::STRING) {
        json_string(os, f.get_string(key));
    } else if (t == GGUFValueType::BOOL) {
        os << (f.get_bool(key, false) ? "true" : "false");
    } else if (is_float(t)) {
        json_number(os, f.get_float(key));
    } else if (t != GGUFValueType::ARRAY) {
        os << f.get_int(key);
    } else {
        const GGUFValueType e = f.array_type(key);
        if (e == GGUFValueType::STRING) {
            print_list(os, f.get_string_array(key),
                       [&](const std::string& v) { json_string(os, v); });
        } else if (is_float(e)) {
            print_list(os, f.get_float_array(key), [&](double v) { json_number(os, v); });
        } else if (e != GGUFValueType::BOOL && e != GGUFValueType::ARRAY) {
            print_list(os, f.get_int_array(key), [&](int64_t v) { os << v; });
        } else {
            os << "null";
        }
    }
}

void info(const GGUFFile& f) {
    std::ostream& os = std::cout;
    os << "{\"version\":" << f.version() << ",\"alignment\":" << f.alignment()
       << ",\"data_offset\":" << f.data_offset() << ",\"metadata\":[";
    const char* sep = "";
    for (const std::string& key : f.keys()) {
        const GGUFValueType t = f.value_type(key);
        os << sep << "{\"key\":";
        json_string(os, key);
        os << ",\"type\":\"" << veloxquant::gguf_value_type_name(t) << '"';
        if (t == GGUFValueType::ARRAY) {
            os << ",\"elem_type\":\"" << veloxquant::gguf_value_type_name(f.array_type(key)) << '"';
        }
        os << ",\"value\":";
        print_value(os, f, key);
        os << '}';
        sep = ",\n";
    }
    os << "],\"tensors\":[";
    sep = "";
    for (const GGUFTensor& t : f.tensors()) {
        os << sep << "{\"name\":";
        json_string(os, t.name);
        os << ",\"dims\":[";
        for (std::size_t i = 0; i < t.dims.size(); ++i) os << (i ? "," : "") << t.dims[i];
        os << "],\"type\":\"" << veloxquant::ggml_type_name(t.type) << "\",\"offset\":" << t.offset
           << ",\"nbytes\":" << t.nbytes << '}';
        sep = ",\n";
    }
    os << "]}\n";
}

int dequant(const GGUFFile& f, const std::string& name, const std::string& out, int64_t begin,
            int64_t count) {
    const GGUFTensor* t = f.find_tensor(name);
    if (t == nullptr) {
        std::cerr << "gguf_dump: no tensor '" << name << "'\n";
        return 1;
    }
    if (count < 0) count = t->rows() - begin;
    if (begin < 0 || count < 0 || begin + count > t->rows()) {
        std::cerr << "gguf_dump: rows [" << begin << ", " << begin + count << ") out of range\n";
        return 1;
    }
    const std::size_t row_bytes = veloxquant::ggml_row_bytes(t->type, t->cols());
    std::vector<float> row(static_cast<std::size_t>(t->cols()));
    std::ofstream os(out, std::ios::binary);
    for (int64_t r = begin; r < begin + count; ++r) {
        veloxquant::dequantize_row(t->type, t->data + static_cast<std::size_t>(r) * row_bytes,
                                   row.data(), t->cols());
        os.write(reinterpret_cast<const char*>(row.data()),
                 static_cast<std::streamsize>(row.size() * sizeof(float)));
    }
    if (!os.flush()) {
        std::cerr << "gguf_dump: cannot write " << out << '\n';
        return 1;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    const bool is_info = cmd == "info" && argc == 3;
    const bool is_dequant = cmd == "dequant" && (argc == 5 || argc == 7);
    if (!is_info && !is_dequant) {
        std::cerr << "usage: gguf_dump info FILE\n"
                     "       gguf_dump dequant FILE TENSOR OUT [ROW_BEGIN ROW_COUNT]\n";
        return 2;
    }
    try {
        const auto f = GGUFFile::open(argv[2]);
        if (is_info) {
            info(*f);
            return 0;
        }
        const int64_t begin = argc == 7 ? std::atoll(argv[5]) : 0;
        const int64_t count = argc == 7 ? std::atoll(argv[6]) : -1;
        return dequant(*f, argv[3], argv[4], begin, count);
    } catch (const std::exception& e) {
        std::cerr << "gguf_dump: " << e.what() << '\n';
        return 1;
    }
}
