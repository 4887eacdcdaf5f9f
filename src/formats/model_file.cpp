#include "formats/model_file.h"

#include <filesystem>

#include "common/error.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/llama2c.h"
#include "formats/tokenizer_bin.h"

namespace si {

namespace {

Vocab load_vocab_for(const std::string& path, int n_vocab) {
    if (looks_like_gguf(path)) {
        auto r = gguf::Reader::open(path);
        return load_gguf_vocab(r);
    }
    return load_tokenizer_bin(path, n_vocab);
}

std::string find_tokenizer_beside(const std::string& model_path, int n_vocab) {
    const auto dir = std::filesystem::path(model_path).parent_path();
    for (const std::string& name : {"tok" + std::to_string(n_vocab) + ".bin", std::string("tokenizer.bin")}) {
        const auto p = dir / name;
        if (std::filesystem::exists(p)) return p.string();
    }
    return "";
}

}  // namespace

std::shared_ptr<const TensorSource> source_for(const ModelFile& m) {
    if (m.lazy) return m.source;
    return std::make_shared<DenseSource>(m.weights);
}

ModelFile load_model_file(const std::string& path, const std::string& tokenizer_path, LoadWeights load) {
    if (!std::filesystem::exists(path)) fail(Status::io, path + ": no such file");
    ModelFile m;
    m.path = path;
    if (looks_like_gguf(path)) {
        m.format = ModelFileFormat::gguf;
        auto r = std::make_shared<const gguf::Reader>(gguf::Reader::open(path));
        if (load == LoadWeights::lazy) {
            auto src = std::make_shared<const GgufSource>(r);
            m.weights.cfg = src->config();
            m.source = std::move(src);
            m.lazy = true;
        } else {
            m.weights = load_gguf_model(*r);
        }
        if (tokenizer_path.empty()) {
            m.vocab = load_gguf_vocab(*r);
            m.vocab_path = path;
        }
        m.gguf = std::move(r);
    } else {
        m.format = ModelFileFormat::llama2c;
        m.weights = load_llama2c(path);
    }
    if (m.vocab_path.empty()) {
        m.vocab_path = tokenizer_path.empty() ? find_tokenizer_beside(path, m.weights.cfg.vocab_size) : tokenizer_path;
        if (m.vocab_path.empty())
            fail(Status::invalid_argument, path + ": the model carries no vocabulary; pass a tokenizer file (--tokenizer)");
        m.vocab = load_vocab_for(m.vocab_path, m.weights.cfg.vocab_size);
    }
    if (int(m.vocab.size()) != m.weights.cfg.vocab_size)
        fail(Status::format, m.vocab_path + ": vocabulary has " + std::to_string(m.vocab.size()) + " tokens but model " + path +
                                 " expects " + std::to_string(m.weights.cfg.vocab_size));
    return m;
}

Vocab load_vocab_file(const std::string& path) {
    if (!std::filesystem::exists(path)) fail(Status::io, path + ": no such file");
    if (looks_like_gguf(path)) {
        auto r = gguf::Reader::open(path);
        return load_gguf_vocab(r);
    }
    return load_tokenizer_bin(path, count_tokenizer_bin(path));
}

}  // namespace si
