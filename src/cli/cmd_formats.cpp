// Commands on model files: info (hyper-parameters and tensor table) and convert (llama2.c or GGUF -> GGUF).
#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "cli/cli.h"
#include "common/error.h"
#include "engine/random_model.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/llama2c.h"
#include "formats/model_file.h"

namespace si::cli {

namespace {

void print_config(const ModelConfig& c, bool tied) {
    std::printf("  dim %d, hidden %d, layers %d, heads %d, kv heads %d, head dim %d\n", c.dim, c.hidden_dim, c.n_layers,
                c.n_heads, c.n_kv_heads, c.head_dim());
    std::printf("  vocab %d, context %d, rope theta %g, rms eps %g, classifier %s\n", c.vocab_size, c.seq_len,
                double(c.rope_theta), double(c.norm_eps), tied ? "tied to embeddings" : "separate");
    std::printf("  parameters %llu\n", static_cast<unsigned long long>(c.n_params(tied)));
}

std::string shape_str(const std::vector<uint64_t>& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
}

int info_gguf(const std::string& path, bool show_metadata) {
    const gguf::Reader r = gguf::Reader::open(path);
    const GgufInfo info = describe_gguf(r);
    std::printf("%s: GGUF v%u, %llu bytes, alignment %u, %zu tensors, %zu metadata keys\n", path.c_str(), info.version,
                static_cast<unsigned long long>(info.file_size), info.alignment, info.tensors.size(), info.metadata.size());
    std::printf("  architecture %s, name %s\n", info.architecture.empty() ? "(none)" : info.architecture.c_str(),
                info.model_name.empty() ? "(none)" : info.model_name.c_str());
    if (info.config)
        print_config(*info.config, info.tied_classifier);
    else if (!info.tensors.empty())
        std::printf("  not a runnable llama model: %s\n", info.config_error.c_str());
    if (show_metadata) {
        std::printf("\nmetadata:\n");
        for (const auto& [k, v] : info.metadata) std::printf("  %-44s %s\n", k.c_str(), v.c_str());
    }
    std::printf("\n%-32s %-6s %-16s %12s %12s\n", "tensor", "type", "shape", "elements", "bytes");
    for (const auto& t : info.tensors)
        std::printf("%-32s %-6s %-16s %12llu %12llu\n", t.name.c_str(), t.type.c_str(), shape_str(t.shape).c_str(),
                    static_cast<unsigned long long>(t.n_elements), static_cast<unsigned long long>(t.n_bytes));
    std::printf("total: %llu elements, %llu bytes\n", static_cast<unsigned long long>(info.n_params),
                static_cast<unsigned long long>(info.tensor_bytes));
    return 0;
}

int info_llama2c(const std::string& path) {
    const ModelWeights w = load_llama2c(path);
    const ModelConfig& c = w.cfg;
    std::printf("%s: llama2.c checkpoint (version 0, fp32)\n", path.c_str());
    print_config(c, w.tied());
    const uint64_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim(), v = c.vocab_size;
    std::printf("\n%-32s %-6s %-16s %12s\n", "tensor", "type", "shape [out, in]", "elements");
    auto row = [](const std::string& name, std::vector<uint64_t> shape) {
        uint64_t n = 1;
        for (auto s : shape) n *= s;
        std::printf("%-32s %-6s %-16s %12llu\n", name.c_str(), "F32", shape_str(shape).c_str(), static_cast<unsigned long long>(n));
    };
    row("token_embedding_table", {v, d});
    for (int l = 0; l < c.n_layers; ++l) {
        const std::string p = "layers." + std::to_string(l) + ".";
        row(p + "rms_att", {d});
        row(p + "wq", {d, d});
        row(p + "wk", {kv, d});
        row(p + "wv", {kv, d});
        row(p + "wo", {d, d});
        row(p + "rms_ffn", {d});
        row(p + "w1", {h, d});
        row(p + "w2", {d, h});
        row(p + "w3", {h, d});
    }
    row("rms_final", {d});
    if (!w.tied()) row("wcls", {v, d});
    return 0;
}

}  // namespace

Runner add_info(CLI::App& app) {
    auto* sub = app.add_subcommand("info", "print a model file's hyper-parameters and tensor table");
    auto file = std::make_shared<std::string>();
    auto metadata = std::make_shared<bool>(false);
    sub->add_option("file", *file, "GGUF file or llama2.c checkpoint")->required();
    sub->add_flag("--metadata", *metadata, "also list every GGUF metadata key");
    return [=]() -> int { return looks_like_gguf(*file) ? info_gguf(*file, *metadata) : info_llama2c(*file); };
}

// Pads the SwiGLU hidden width with zero units: gate and up rows of zeros give silu(0) * 0 = 0, and the down
// projection's new columns are zero, so every output is unchanged.
static void pad_hidden_dim(ModelWeights& w, int multiple) {
    const int64_t d = w.cfg.dim, h = w.cfg.hidden_dim;
    const int64_t hp = (h + multiple - 1) / multiple * multiple;
    if (hp == h) return;
    for (LayerWeights& L : w.layers) {
        L.w1.resize(size_t(hp * d), 0.0f);  // [hidden][dim]: new rows at the end
        L.w3.resize(size_t(hp * d), 0.0f);
        std::vector<float> w2(size_t(d * hp), 0.0f);  // [dim][hidden]: new columns in every row
        for (int64_t r = 0; r < d; ++r) std::copy_n(&L.w2[size_t(r * h)], h, &w2[size_t(r * hp)]);
        L.w2 = std::move(w2);
    }
    w.cfg.hidden_dim = int(hp);
}

Runner add_convert(CLI::App& app) {
    auto* sub = app.add_subcommand("convert", "write a GGUF model (llama.cpp conventions) from a llama2.c checkpoint, a GGUF, or random weights");
    struct Opts {
        std::string model, tokenizer, out, type = "f32", name, random_shape;
        uint64_t seed = 1;
        int pad_hidden = 0;
    };
    auto o = std::make_shared<Opts>();
    sub->add_option("-m,--model", o->model, "input model (llama2.c checkpoint or GGUF)");
    sub->add_option("--tokenizer", o->tokenizer, "vocabulary (tokenizer.bin or GGUF); required for llama2.c input without one beside it, and for --random-shape");
    sub->add_option("-o,--output", o->out, "output GGUF file")->required();
    sub->add_option("--outtype", o->type, "tensor type of the matrices")->check(CLI::IsMember({"f32", "f16", "q8_0"}));
    sub->add_option("--name", o->name, "general.name (default: the input file name)");
    sub->add_option("--random-shape", o->random_shape, "write a random-weight model of this shape instead (stories260k, stories15m, stories110m, tinyllama, "
                                                        "llama2-7b, llama3-8b; generated and written one tensor at a time)");
    sub->add_option("--seed", o->seed, "seed of --random-shape weights");
    sub->add_option("--pad-hidden", o->pad_hidden,
                    "pad the feed-forward width with zero units up to a multiple of this (e.g. 256, so that "
                    "llama-quantize can store ffn_down in k-quants); the model computes the same function")
        ->check(CLI::Range(1, 65536));
    return [o]() -> int {
        if (o->model.empty() == o->random_shape.empty()) throw UsageError("give exactly one of --model and --random-shape");
        // Tensor by tensor from the input (a memory-mapped GGUF, or generated) into the output file; only
        // --pad-hidden (and a llama2.c input) holds the model in memory.
        ModelFile m;
        std::shared_ptr<const TensorSource> src;
        Vocab vocab;
        std::string name = o->name;
        if (!o->model.empty()) {
            m = load_model_file(o->model, o->tokenizer, LoadWeights::lazy);
            src = source_for(m);
            vocab = std::move(m.vocab);
            if (name.empty()) name = std::filesystem::path(o->model).stem().string();
        } else {
            if (o->tokenizer.empty()) throw UsageError("--random-shape needs --tokenizer for the vocabulary");
            src = std::make_shared<RandomSource>(shape_preset(o->random_shape), o->seed);
            vocab = load_vocab_file(o->tokenizer);
            if (int(vocab.size()) != src->config().vocab_size)
                throw Error(Status::invalid_argument, o->tokenizer + ": vocabulary has " + std::to_string(vocab.size()) +
                                                          " tokens; shape " + o->random_shape + " needs " +
                                                          std::to_string(src->config().vocab_size));
            if (name.empty()) name = o->random_shape + "-random";
        }
        ModelWeights padded;
        if (o->pad_hidden > 0) {
            padded = materialize(*src);
            pad_hidden_dim(padded, o->pad_hidden);
            src = std::make_shared<DenseSource>(padded);
        }
        const GgufWeightType type = o->type == "q8_0" ? GgufWeightType::q8_0 : o->type == "f16" ? GgufWeightType::f16 : GgufWeightType::f32;
        const auto notes = write_gguf_model(o->out, *src, vocab, type, name);
        for (const auto& n : notes) std::fprintf(stderr, "convert: %s\n", n.c_str());
        std::fprintf(stderr, "convert: wrote %s (%s, %d layers, vocab %d)\n", o->out.c_str(), o->type.c_str(),
                     src->config().n_layers, src->config().vocab_size);
        return 0;
    };
}

}  // namespace si::cli
