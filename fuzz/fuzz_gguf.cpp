// libFuzzer target for the GGUF reader and the llama model / vocabulary loaders: any input must either parse or
// fail with si::Error; never crash, hang, read out of bounds or allocate more than a small multiple of its size.
// A file that parses must also survive a writer round trip unchanged (same metadata, same tensor bytes).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/error.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"

using namespace si;

namespace {

template <class F>
void quietly(F&& f) {
    try {
        f();
    } catch (const Error&) {
    }
}

void touch_metadata(const gguf::Reader& r) {
    for (const auto& kv : r.metadata()) {
        (void)gguf::render(kv.value);
        const std::string& k = kv.key;
        quietly([&] { (void)r.get_u32(k); });
        quietly([&] { (void)r.get_i32(k); });
        quietly([&] { (void)r.get_u64(k); });
        quietly([&] { (void)r.get_i64(k); });
        quietly([&] { (void)r.get_f32(k); });
        quietly([&] { (void)r.get_f64(k); });
        quietly([&] { (void)r.get_bool(k); });
        quietly([&] { (void)r.get_str(k); });
        quietly([&] { (void)r.get_str_array(k); });
        quietly([&] { (void)r.get_f32_array(k); });
        quietly([&] { (void)r.get_int_array(k); });
    }
}

void touch_tensors(const gguf::Reader& r) {
    volatile float sink = 0;
    for (const auto& t : r.tensors()) {
        const auto bytes = r.tensor_data(t);
        if (!bytes.empty()) sink = sink + float(bytes.front()) + float(bytes.back());
        if (r.find_tensor(t.name) != &t) std::abort();
        quietly([&] {
            const auto f = r.to_f32(t);
            if (!f.empty()) sink = sink + f.back();
        });
    }
}

// Copies the parsed file through the writer and checks the copy reads back identically.
void round_trip(const gguf::Reader& r) {
    gguf::Writer w;
    try {
        for (const auto& kv : r.metadata()) w.set(kv.key, kv.value);
        for (const auto& t : r.tensors()) {
            const auto d = r.tensor_data(t);
            w.add_tensor_raw(t.name, t.shape(), t.type, {d.begin(), d.end()});
        }
    } catch (const Error& e) {
        // The writer is stricter than the reader (ggml's 63-byte names, u32-only alignment): skip those files.
        if (e.status() != Status::invalid_argument) std::abort();
        return;
    }
    const std::string image = w.serialize();
    const gguf::Reader c = gguf::Reader::from_memory(image, "copy.gguf");  // must not throw
    if (c.metadata().size() != r.metadata().size() || c.tensors().size() != r.tensors().size()) std::abort();
    for (size_t i = 0; i < r.metadata().size(); ++i)
        if (c.metadata()[i].key != r.metadata()[i].key || !(c.metadata()[i].value == r.metadata()[i].value)) std::abort();
    for (size_t i = 0; i < r.tensors().size(); ++i) {
        const auto& a = r.tensors()[i];
        const auto& b = c.tensors()[i];
        const auto da = r.tensor_data(a), db = c.tensor_data(b);
        if (a.name != b.name || a.ne != b.ne || a.type != b.type || da.size() != db.size() ||
            (da.size() && std::memcmp(da.data(), db.data(), da.size()) != 0))
            std::abort();
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        const gguf::Reader r = gguf::Reader::from_memory(data, size, "fuzz.gguf");
        touch_metadata(r);
        touch_tensors(r);
        (void)describe_gguf(r);
        quietly([&] { (void)load_gguf_model(r); });
        quietly([&] { (void)load_gguf_vocab(r); });
        round_trip(r);
    } catch (const Error& e) {
        if (e.status() != Status::format && e.status() != Status::unsupported) std::abort();
    }
    return 0;
}
