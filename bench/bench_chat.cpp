// Chat front end costs: Llama 3 (byte-level BPE) tokenization and chat-template rendering, against the SentencePiece
// tokenizer on the same text. Run from the build directory: bench/bench_chat [--benchmark_filter=REGEX]; the shared
// data is found through SI_SHARED_DIR (default ../shared beside the source tree).
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include <benchmark/benchmark.h>

#include "chat/chat_template.h"
#include "common/tokenizer.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"

namespace {

std::string shared(const std::string& rel) { return std::string(SI_SHARED_DIR) + "/" + rel; }

std::string read(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

const std::string& text() {
    static const std::string t = read(shared("data/tinystories_val.txt")).substr(0, 200000);
    return t;
}

const si::Tokenizer& tokenizer(const char* file) {
    static std::map<std::string, std::unique_ptr<si::Tokenizer>> cache;
    auto& t = cache[file];
    if (!t) t = std::make_unique<si::Tokenizer>(si::load_gguf_vocab(si::gguf::Reader::open(shared(file))), file);
    return *t;
}

void encode(benchmark::State& state, const char* file) {
    const si::Tokenizer& tok = tokenizer(file);
    size_t n = 0;
    for (auto _ : state) {
        const auto ids = tok.encode(text(), false);
        n += ids.size();
        benchmark::DoNotOptimize(ids.data());
    }
    state.counters["tokens/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsRate);
    state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(text().size()));
}
BENCHMARK_CAPTURE(encode, llama3_bpe, "models/ggml-vocab-llama-bpe.gguf")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(encode, llama2_spm, "models/ggml-vocab-llama-spm.gguf")->Unit(benchmark::kMillisecond);

void load_bpe_vocab(benchmark::State& state) {
    for (auto _ : state) {
        si::Tokenizer t(si::load_gguf_vocab(si::gguf::Reader::open(shared("models/ggml-vocab-llama-bpe.gguf"))));
        benchmark::DoNotOptimize(&t);
    }
}
BENCHMARK(load_bpe_vocab)->Unit(benchmark::kMillisecond);

// A 10-turn conversation with a system message, rendered with the generation prompt.
void render(benchmark::State& state, const char* file) {
    const si::chat::ChatTemplate t(read(shared(std::string("templates/") + file)), "<s>", "</s>", false);
    std::string conv = R"([{"role": "system", "content": "You are a helpful assistant."})";
    for (int i = 0; i < 10; ++i)
        conv += R"(, {"role": "user", "content": "Question number )" + std::to_string(i) +
                R"( about something fairly long, with a few words."}, {"role": "assistant", "content": "An answer."})";
    conv += R"(, {"role": "user", "content": "Last question?"}])";
    const si::chat::Value messages = si::chat::from_json(conv);
    size_t bytes = 0;
    for (auto _ : state) {
        try {
            bytes += t.apply(messages).size();
        } catch (const si::chat::TemplateError&) {  // Gemma refuses the system message: render without it
            state.SkipWithError("template refused the conversation");
            break;
        }
    }
    state.SetBytesProcessed(int64_t(bytes));
}
BENCHMARK_CAPTURE(render, llama31, "meta-llama-Llama-3.1-8B-Instruct.jinja")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(render, qwen25, "Qwen-Qwen2.5-7B-Instruct.jinja")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(render, mistral_nemo, "mistralai-Mistral-Nemo-Instruct-2407.jinja")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(render, deepseek_r1, "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(render, smollm3, "HuggingFaceTB-SmolLM3-3B.jinja")->Unit(benchmark::kMicrosecond);

void parse_template(benchmark::State& state) {
    const std::string src = read(shared("templates/meta-llama-Llama-3.1-8B-Instruct.jinja"));
    for (auto _ : state) {
        si::chat::Template t(src);
        benchmark::DoNotOptimize(&t);
    }
}
BENCHMARK(parse_template)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
