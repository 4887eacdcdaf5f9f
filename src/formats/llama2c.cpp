#include "formats/llama2c.h"

#include <cstdint>
#include <cstring>
#include <fstream>

#include "common/error.h"

namespace si {

bool looks_like_gguf(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    char magic[4] = {};
    f.read(magic, 4);
    return f && std::memcmp(magic, "GGUF", 4) == 0;
}

ModelWeights load_llama2c(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) fail(Status::io, path + ": cannot open file");
    const uint64_t file_size = uint64_t(f.tellg());
    f.seekg(0);
    int32_t hdr[7];
    if (file_size < sizeof hdr || !f.read(reinterpret_cast<char*>(hdr), sizeof hdr))
        fail(Status::format, path + ": truncated llama2.c header (" + std::to_string(file_size) + " bytes)");

    ModelWeights w;
    ModelConfig& c = w.cfg;
    c.dim = hdr[0];
    c.hidden_dim = hdr[1];
    c.n_layers = hdr[2];
    c.n_heads = hdr[3];
    c.n_kv_heads = hdr[4];
    const bool shared_classifier = hdr[5] > 0;
    c.vocab_size = hdr[5] == INT32_MIN ? 0 : (hdr[5] < 0 ? -hdr[5] : hdr[5]);
    c.seq_len = hdr[6];
    c.validate(path + ": llama2.c header");

    const uint64_t d = c.dim, h = c.hidden_dim, L = c.n_layers, kv = c.kv_dim(), v = c.vocab_size, hs = c.head_dim();
    const uint64_t n_floats = v * d + L * d + L * d * d + 2 * L * d * kv + L * d * d + L * d + 3 * L * d * h + d +
                              2 * uint64_t(c.seq_len) * hs / 2 + (shared_classifier ? 0 : v * d);
    const uint64_t expected = sizeof hdr + n_floats * 4;
    if (file_size != expected)
        fail(Status::format, path + ": file size " + std::to_string(file_size) + " does not match the header's shapes (expected " +
                                 std::to_string(expected) + " bytes" + (file_size < expected ? ", file truncated)" : ")"));

    auto read = [&](std::vector<float>& dst, uint64_t n, const char* what) {
        dst.resize(n);
        if (!f.read(reinterpret_cast<char*>(dst.data()), std::streamsize(n * 4)))
            fail(Status::io, path + ": read error in tensor " + what);
    };
    auto read_layers = [&](std::vector<float> LayerWeights::*member, uint64_t n, const char* what) {
        for (auto& layer : w.layers) read(layer.*member, n, what);
    };
    w.layers.resize(L);
    read(w.tok_embeddings, v * d, "token_embedding_table");
    read_layers(&LayerWeights::attn_norm, d, "rms_att_weight");
    read_layers(&LayerWeights::wq, d * d, "wq");
    read_layers(&LayerWeights::wk, kv * d, "wk");
    read_layers(&LayerWeights::wv, kv * d, "wv");
    read_layers(&LayerWeights::wo, d * d, "wo");
    read_layers(&LayerWeights::ffn_norm, d, "rms_ffn_weight");
    read_layers(&LayerWeights::w1, h * d, "w1");
    read_layers(&LayerWeights::w2, d * h, "w2");
    read_layers(&LayerWeights::w3, h * d, "w3");
    read(w.final_norm, d, "rms_final_weight");
    std::vector<float> rope_tables;
    read(rope_tables, uint64_t(c.seq_len) * hs, "freq_cis");
    if (!shared_classifier) read(w.classifier, v * d, "wcls");
    w.validate(path);
    return w;
}

}  // namespace si
