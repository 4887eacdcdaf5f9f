#include "host/package.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <fstream>
#include <set>
#include <sstream>

#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "common/matmul.h"
#include "common/secret_memory.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "train/lora.h"

namespace si {

namespace {

using json = nlohmann::json;
using wire::TensorKind;

constexpr const char* kOwnerKeyTag = "secureinfer-owner-key v1";
constexpr const char* kPublicPart = "public.gguf";
constexpr const char* kSecretPart = "secret.bin";

std::vector<uint8_t> read_all(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(Status::io, path + ": cannot open file");
    std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (f.bad()) fail(Status::io, path + ": read error");
    return b;
}

// A base tensor as the package sees it: its GGUF name and shape, and where the trusted core puts it.
struct BaseTensor {
    std::string name;
    std::vector<uint64_t> ne;  // GGUF order
    uint32_t kind = 0;
    int layer = 0, proj = 0;
    const std::vector<float>* data = nullptr;
    uint64_t row = 1;  // elements per row (chunks hold whole rows)
};

std::vector<BaseTensor> base_tensors(const ModelWeights& w) {
    const ModelConfig& c = w.cfg;
    const uint64_t d = uint64_t(c.dim), v = uint64_t(c.vocab_size);
    std::vector<BaseTensor> t;
    t.push_back({"token_embd.weight", {d, v}, uint32_t(TensorKind::tok_embeddings), 0, 0, &w.tok_embeddings, d});
    for (int l = 0; l < c.n_layers; ++l) {
        const LayerWeights& L = w.layers[size_t(l)];
        t.push_back({"blk." + std::to_string(l) + ".attn_norm.weight", {d}, uint32_t(TensorKind::attn_norm), l, 0,
                     &L.attn_norm, 1});
        t.push_back({"blk." + std::to_string(l) + ".ffn_norm.weight", {d}, uint32_t(TensorKind::ffn_norm), l, 0,
                     &L.ffn_norm, 1});
        for (Proj p : kAllProj) {
            const ProjShape s = proj_shape(c, p);
            t.push_back({proj_tensor_name(l, p), {uint64_t(s.cols), uint64_t(s.rows)}, uint32_t(TensorKind::proj_weight),
                         l, int(p), &proj_weights(L, p), uint64_t(s.cols)});
        }
    }
    t.push_back({"output_norm.weight", {d}, uint32_t(TensorKind::final_norm), 0, 0, &w.final_norm, 1});
    if (!w.tied()) t.push_back({"output.weight", {d, v}, uint32_t(TensorKind::classifier), 0, 0, &w.classifier, d});
    return t;
}

uint64_t chunk_elements_for(uint64_t row) { return std::max<uint64_t>(1, pkg::kChunkElements / row) * row; }

void write_file_atomic(const std::string& path, const std::vector<std::span<const uint8_t>>& pieces) {
    const std::string tmp = path + ".tmp";
    {
        std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
        if (!f) fail(Status::io, tmp + ": cannot create file");
        for (const auto& p : pieces) f.write(reinterpret_cast<const char*>(p.data()), std::streamsize(p.size()));
        f.flush();
        if (!f) fail(Status::io, tmp + ": write error");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        fail(Status::io, path + ": cannot rename " + tmp + " into place");
    }
}

std::string hex_hash(std::span<const uint8_t> b) { return pkg::to_hex(pkg::sha256(b)); }

pkg::PublicDigest digest_of(TensorKind kind, int layer, int proj, const void* data, size_t bytes) {
    return {uint32_t(kind), layer, proj, bytes,
            pkg::public_tensor_digest(std::span<const uint8_t>(static_cast<const uint8_t*>(data), bytes))};
}

// What the host uploads to the trusted core in the clear for this model (SecureSession::load_enclave), hashed as the
// core hashes it on arrival: f32 tensors as they are, projections (and the classifier, which is token_embd when
// tied) as int8 rows with f32 scales from quantize_rows_i8, which is exact and the same on every machine.
std::vector<pkg::PublicDigest> public_digests(const ModelWeights& w, const std::set<std::string>& secret) {
    const ModelConfig& c = w.cfg;
    std::vector<pkg::PublicDigest> out;
    auto f32 = [&](TensorKind k, int l, const std::vector<float>& v) {
        out.push_back(digest_of(k, l, 0, v.data(), v.size() * 4));
    };
    auto rows = [&](TensorKind wk, TensorKind sk, int l, int p, const std::vector<float>& W, int64_t r, int64_t cols) {
        std::vector<int8_t> q(size_t(r * cols));
        std::vector<float> scale(static_cast<size_t>(r));
        quantize_rows_i8(W.data(), r, cols, q.data(), scale.data(), nullptr);
        out.push_back(digest_of(wk, l, p, q.data(), q.size()));
        out.push_back(digest_of(sk, l, p, scale.data(), scale.size() * 4));
    };
    if (!secret.count("token_embd.weight")) f32(TensorKind::tok_embeddings, 0, w.tok_embeddings);
    if (!secret.count("output_norm.weight")) f32(TensorKind::final_norm, 0, w.final_norm);
    if (!secret.count("output.weight") && !(w.tied() && secret.count("token_embd.weight")))
        rows(TensorKind::classifier_i8, TensorKind::classifier_scale, 0, 0, w.tied() ? w.tok_embeddings : w.classifier,
             c.vocab_size, c.dim);
    for (int l = 0; l < c.n_layers; ++l) {
        const LayerWeights& L = w.layers[size_t(l)];
        const std::string b = "blk." + std::to_string(l) + ".";
        if (!secret.count(b + "attn_norm.weight")) f32(TensorKind::attn_norm, l, L.attn_norm);
        if (!secret.count(b + "ffn_norm.weight")) f32(TensorKind::ffn_norm, l, L.ffn_norm);
        for (Proj p : kAllProj) {
            if (secret.count(proj_tensor_name(l, p))) continue;
            const ProjShape s = proj_shape(c, p);
            rows(TensorKind::proj_weight, TensorKind::proj_scale, l, int(p), proj_weights(L, p), s.rows, s.cols);
        }
    }
    return out;
}

pkg::BoundConfig bound_config(const ModelWeights& w) {
    const ModelConfig& c = w.cfg;
    return {c.dim,        c.hidden_dim, c.n_layers, c.n_heads,  c.n_kv_heads,          c.vocab_size,
            c.seq_len,    c.rope_theta, c.norm_eps, w.tied() ? 1u : 0u, c.rope_freq_factors};
}

// SHA-256 of the factors as little-endian f32, for the manifest (the table carries the values themselves).
std::string factors_hash(const std::vector<float>& f) {
    std::vector<uint8_t> b;
    b.reserve(f.size() * 4);
    for (const float x : f) pkg::put_f32(b, x);
    return hex_hash(b);
}

}  // namespace

// ---- owner keys --------------------------------------------------------------------------------------------------

pkg::Key generate_owner_key() {
    pkg::Key k{};
    pkg::random_bytes(k);
    return k;
}

void write_owner_key(const std::string& path, const pkg::Key& key) {
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        fail(Status::io, path + (errno == EEXIST ? ": already exists (an owner key is never overwritten)"
                                                 : ": cannot create (" + std::string(std::strerror(errno)) + ")"));
    std::string text = std::string(kOwnerKeyTag) + " " + pkg::to_hex(key) + "\n";
    const bool ok = write(fd, text.data(), text.size()) == ssize_t(text.size()) && fsync(fd) == 0;
    close(fd);
    secure_zero(text.data(), text.size());
    if (!ok) fail(Status::io, path + ": write error");
}

pkg::Key read_owner_key(const std::string& path) {
    std::vector<uint8_t> b = read_all(path);
    std::string text(b.begin(), b.end());
    secure_zero(b.data(), b.size());
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
    const std::string tag = std::string(kOwnerKeyTag) + " ";
    pkg::Key k{};
    const bool ok = text.size() == tag.size() + 64 && text.compare(0, tag.size(), tag) == 0 &&
                    pkg::from_hex(std::string_view(text).substr(tag.size()), k);
    secure_zero(text.data(), text.size());
    if (!ok) fail(Status::format, path + ": not a secureinfer owner key (made by `secureinfer keygen`)");
    return k;
}

// ---- packing -----------------------------------------------------------------------------------------------------

PackResult write_package(const std::string& out_path, const PackOptions& o, const pkg::Key& owner_key) {
    const ModelFile base = load_model_file(o.base, o.tokenizer);
    const ModelWeights& w = base.weights;
    const ModelConfig& c = w.cfg;
    std::vector<train::LoraAdapter> adapters;
    for (const auto& p : o.loras) adapters.push_back(train::read_lora_adapter(p, c));

    // Which base tensors are secret.
    std::vector<BaseTensor> tensors = base_tensors(w);
    std::set<std::string> secret;
    const bool all = o.secret == "all";
    if (all) {
        for (const auto& t : tensors) secret.insert(t.name);
    } else if (o.secret != "lora" && !o.secret.empty()) {
        std::stringstream ss(o.secret);
        std::string name;
        while (std::getline(ss, name, ',')) {
            if (name.empty()) continue;
            if (std::none_of(tensors.begin(), tensors.end(), [&](const BaseTensor& t) { return t.name == name; }))
                fail(Status::invalid_argument, "--secret names no tensor of " + o.base + ": " + name);
            secret.insert(name);
        }
    }
    if (secret.empty() && adapters.empty())
        fail(Status::invalid_argument, "nothing to protect: give --lora, or --secret all / tensor names");

    pkg::ModelId id{};
    pkg::random_bytes(id);
    SecretVector<uint8_t> model_key(pkg::kKeyBytes);
    pkg::derive_model_key(owner_key, id, model_key.data());

    // The public part: the base model as an F32 GGUF without the secret tensors.
    std::string public_gguf;
    {
        const std::string tmp = out_path + ".public.tmp";
        write_gguf_model(tmp, w, base.vocab, GgufWeightType::f32,
                         o.name.empty() ? std::filesystem::path(o.base).stem().string() : o.name);
        try {
            const gguf::Reader r = gguf::Reader::open(tmp);
            gguf::Writer g;
            for (const auto& kv : r.metadata()) g.set(kv.key, kv.value);
            for (const auto& t : r.tensors()) {
                if (secret.count(t.name)) continue;
                const auto bytes = r.tensor_data(t);
                g.add_tensor_raw(t.name, t.shape(), t.type, std::vector<uint8_t>(bytes.begin(), bytes.end()));
            }
            public_gguf = g.serialize();
        } catch (...) {
            std::remove(tmp.c_str());
            throw;
        }
        std::remove(tmp.c_str());
    }

    // The secret tensors, encrypted chunk by chunk into the secret part.
    struct Plain {
        std::string name;
        pkg::SecretEntry entry;
        std::vector<uint64_t> ne;
        const float* data = nullptr;
    };
    std::vector<Plain> plain;
    for (const auto& t : tensors)
        if (secret.count(t.name))
            plain.push_back({t.name, {t.kind, t.layer, t.proj, uint64_t(t.data->size()), chunk_elements_for(t.row), 0, 0.0f},
                             t.ne, t.data->data()});
    // Adapters: one (A, B) per projection; several adapters stack along the rank with their scales folded into B.
    std::deque<std::vector<float>> lora_store;  // stable addresses
    json adapters_json = json::array();
    for (size_t ai = 0; ai < adapters.size(); ++ai)
        adapters_json.push_back({{"file", std::filesystem::path(o.loras[ai]).filename().string()},
                                 {"name", adapters[ai].name}, {"alpha", adapters[ai].alpha},
                                 {"tensors", adapters[ai].tensors.size()}});
    for (int l = 0; l < c.n_layers && !adapters.empty(); ++l)
        for (Proj p : kAllProj) {
            std::vector<std::pair<const train::LoraAdapter*, const train::LoraTensor*>> parts;
            for (const auto& a : adapters)
                for (const auto& t : a.tensors)
                    if (t.layer == l && t.proj == p) parts.push_back({&a, &t});
            if (parts.empty()) continue;
            const ProjShape s = proj_shape(c, p);
            int rank = 0;
            for (const auto& [a, t] : parts) rank += t->rank;
            if (rank > std::min<int64_t>(s.rows, s.cols))
                fail(Status::invalid_argument, "the adapters' combined rank " + std::to_string(rank) + " for " +
                                                   proj_tensor_name(l, p) + " exceeds the projection's size");
            std::vector<float> A, B(size_t(s.rows) * size_t(rank));
            float scale = 1.0f;
            if (parts.size() == 1) {
                A = parts[0].second->a;
                B = parts[0].second->b;
                scale = parts[0].first->tensor_scale(*parts[0].second, o.lora_scale);
            } else {
                int r0 = 0;
                for (const auto& [a, t] : parts) {
                    A.insert(A.end(), t->a.begin(), t->a.end());
                    const float sc = a->tensor_scale(*t, o.lora_scale);
                    for (int64_t row = 0; row < s.rows; ++row)
                        for (int k = 0; k < t->rank; ++k)
                            B[size_t(row) * size_t(rank) + size_t(r0 + k)] = sc * t->b[size_t(row) * size_t(t->rank) + size_t(k)];
                    r0 += t->rank;
                }
            }
            lora_store.push_back(std::move(A));
            const std::vector<float>& As = lora_store.back();
            lora_store.push_back(std::move(B));
            const std::vector<float>& Bs = lora_store.back();
            const std::string stem = proj_tensor_name(l, p);
            plain.push_back({stem + ".lora_a", {uint32_t(TensorKind::lora_a), l, int(p), As.size(),
                                                 chunk_elements_for(uint64_t(s.cols)), 0, scale},
                             {uint64_t(s.cols), uint64_t(rank)}, As.data()});
            plain.push_back({stem + ".lora_b", {uint32_t(TensorKind::lora_b), l, int(p), Bs.size(),
                                                 chunk_elements_for(uint64_t(rank)), 0, 0.0f},
                             {uint64_t(rank), uint64_t(s.rows)}, Bs.data()});
        }

    std::vector<uint8_t> secret_blob;
    pkg::Table table;
    json tensors_json = json::array();
    std::set<std::string> secret_names_seen;
    int encrypted = 0;
    for (auto& pl : plain) {
        pkg::SecretEntry& e = pl.entry;
        e.n_chunks = uint32_t((e.elements + e.chunk_elements - 1) / e.chunk_elements);
        if (pkg::secret_tensor_name(e.kind, e.layer, e.proj) != pl.name)
            fail(Status::internal, "package: tensor naming mismatch for " + pl.name);
        SecretVector<uint8_t> key(pkg::kKeyBytes);
        pkg::derive_tensor_key(model_key.data(), id, pl.name, key.data());
        const size_t at = secret_blob.size();
        for (uint32_t ch = 0; ch < e.n_chunks; ++ch) {
            const uint64_t first = uint64_t(ch) * e.chunk_elements, n = std::min(e.chunk_elements, e.elements - first);
            const auto aad = pkg::chunk_aad(id, pl.name, ch, e.n_chunks, e.elements);
            const auto iv = pkg::chunk_iv(ch);
            const size_t o2 = secret_blob.size();
            secret_blob.resize(o2 + size_t(n) * 4 + pkg::kTagBytes);
            pkg::gcm_seal(key.data(), iv.data(), aad, reinterpret_cast<const uint8_t*>(pl.data + first), size_t(n) * 4,
                          secret_blob.data() + o2);
        }
        const std::span<const uint8_t> ct(secret_blob.data() + at, secret_blob.size() - at);
        table.secrets.push_back(e);
        secret_names_seen.insert(pl.name);
        tensors_json.push_back({{"name", pl.name}, {"ne", pl.ne}, {"dtype", "f32"}, {"secret", true},
                                {"part", kSecretPart}, {"offset", at}, {"size", ct.size()},
                                {"chunks", e.n_chunks}, {"chunk_elements", e.chunk_elements},
                                {"sha256", hex_hash(ct)}});
        if (o.progress) o.progress(++encrypted, int(plain.size()));
    }
    for (const auto& t : tensors)
        if (!secret.count(t.name))
            tensors_json.push_back({{"name", t.name}, {"ne", t.ne}, {"dtype", "f32"}, {"secret", false},
                                    {"part", kPublicPart}});
    for (auto& v : lora_store) secure_zero(v.data(), v.size() * sizeof(float));
    lora_store.clear();

    const json manifest = {
        {"format", "secureinfer-package"},
        {"version", pkg::kFormatVersion},
        {"model_id", pkg::to_hex(id)},
        {"name", o.name.empty() ? std::filesystem::path(o.base).stem().string() : o.name},
        {"config",
         {{"dim", c.dim}, {"hidden_dim", c.hidden_dim}, {"n_layers", c.n_layers}, {"n_heads", c.n_heads},
          {"n_kv_heads", c.n_kv_heads}, {"vocab_size", c.vocab_size}, {"seq_len", c.seq_len},
          {"tied_classifier", w.tied()}, {"rope_freq_factors", c.rope_freq_factors.size()},
          {"rope_freq_factors_sha256", c.rope_freq_factors.empty() ? "" : factors_hash(c.rope_freq_factors)}}},
        {"sampling_policy",
         {{"max_temperature", o.sampling.max_temperature}, {"min_top_k", o.sampling.min_top_k},
          {"min_top_p", o.sampling.min_top_p}, {"min_logprob_noise", o.sampling.min_logprob_noise}}},
        {"secret", all ? "all" : secret.empty() ? "lora" : "list"},
        {"secret_base_tensors", all ? std::vector<std::string>{"*"}
                                    : std::vector<std::string>(secret.begin(), secret.end())},
        {"adapters", adapters_json},
        {"parts",
         json::array({{{"name", kPublicPart}, {"offset", 0}, {"size", public_gguf.size()},
                       {"sha256", hex_hash(std::span<const uint8_t>(
                                      reinterpret_cast<const uint8_t*>(public_gguf.data()), public_gguf.size()))}},
                      {{"name", kSecretPart}, {"offset", public_gguf.size()}, {"size", secret_blob.size()},
                       {"sha256", hex_hash(secret_blob)}}})},
        {"tensors", tensors_json},
    };
    const std::string man = manifest.dump(1) + "\n";
    // The trusted core takes nothing the host sends in the clear that this table does not bind.
    table.config = bound_config(w);
    table.sampling = o.sampling;
    table.publics = public_digests(w, secret);
    const std::vector<uint8_t> tbl = pkg::encode_table(table);
    pkg::Header h;
    h.model_id = id;
    if (o.release_logprobs < 0 || uint32_t(o.release_logprobs) > pkg::kReleaseLogprobsMask)
        fail(Status::invalid_argument, "pack: --release-logprobs must be in [0, " +
                                           std::to_string(pkg::kReleaseLogprobsMask) + "]");
    h.release = uint32_t(o.release_logprobs) | (o.release_nll ? pkg::kReleaseNll : 0u);
    h.manifest_len = man.size();
    h.table_len = tbl.size();
    h.payload_offset = pkg::kHeaderBytes + man.size() + tbl.size() + pkg::kHashBytes;
    const auto head = pkg::encode_header(h);
    std::vector<uint8_t> body(head.begin(), head.end());
    body.insert(body.end(), man.begin(), man.end());
    body.insert(body.end(), tbl.begin(), tbl.end());
    SecretVector<uint8_t> mk(pkg::kKeyBytes);
    pkg::derive_manifest_key(model_key.data(), id, mk.data());
    const pkg::Hash mac = pkg::hmac_sha256(mk, body);
    body.insert(body.end(), mac.begin(), mac.end());
    write_file_atomic(out_path, {body, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(public_gguf.data()),
                                                                public_gguf.size()),
                                 secret_blob});
    PackResult r;
    r.model_id = id;
    r.file_bytes = body.size() + public_gguf.size() + secret_blob.size();
    r.public_bytes = public_gguf.size();
    r.secret_bytes = secret_blob.size();
    r.n_secret = table.secrets.size();
    r.n_public = tensors.size() - secret.size();
    return r;
}

// ---- opening -----------------------------------------------------------------------------------------------------

bool is_package_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    char m[8] = {};
    return f.read(m, 8) && std::memcmp(m, pkg::kMagic, 8) == 0;
}

std::span<const uint8_t> Package::authenticated_prefix() const {
    return std::span<const uint8_t>(bytes_->data(), size_t(header_.payload_offset));
}

bool Package::has_adapter() const {
    return std::any_of(secrets_.begin(), secrets_.end(),
                       [](const SecretTensor& s) { return s.entry.kind == uint32_t(TensorKind::lora_a); });
}

std::shared_ptr<const Package> Package::open(const std::string& path, bool check_hashes) {
    auto p = std::shared_ptr<Package>(new Package());
    p->path_ = path;
    p->bytes_ = std::make_shared<const std::vector<uint8_t>>(read_all(path));
    const std::vector<uint8_t>& b = *p->bytes_;
    auto bad = [&](const std::string& why) { fail(Status::format, path + ": " + why); };
    try {
        p->header_ = pkg::decode_header(b);
    } catch (const Error& e) {
        fail(e.status(), path + ": " + e.what());
    }
    const pkg::Header& h = p->header_;
    if (b.size() < h.payload_offset)
        bad("truncated: " + std::to_string(b.size()) + " bytes, but the header, manifest, secret table and MAC take " +
            std::to_string(h.payload_offset));
    p->manifest_.assign(reinterpret_cast<const char*>(b.data()) + pkg::kHeaderBytes, size_t(h.manifest_len));
    json m;
    try {
        m = json::parse(p->manifest_);
    } catch (const json::exception& e) {
        bad(std::string("manifest is not valid JSON (") + e.what() + ")");
    }
    pkg::Table table;
    try {
        table = pkg::decode_table(std::span<const uint8_t>(b.data() + pkg::kHeaderBytes + h.manifest_len, size_t(h.table_len)));
    } catch (const Error& e) {
        bad(e.what());
    }
    p->sampling_ = table.sampling;
    p->n_bound_ = table.publics.size();
    const std::span<const uint8_t> payload(b.data() + h.payload_offset, b.size() - size_t(h.payload_offset));
    try {
        if (m.at("format") != "secureinfer-package") bad("manifest: format is not secureinfer-package");
        if (m.at("version").get<uint32_t>() != h.version)
            fail(Status::format, path + ": manifest version " + m.at("version").dump() + " differs from the header's");
        if (m.at("model_id").get<std::string>() != pkg::to_hex(h.model_id))
            bad("manifest model_id differs from the header's");
        // parts: inside the payload, back to back, hashes as listed
        std::map<std::string, std::span<const uint8_t>> parts;
        std::string altered_part;  // reported after the secret tensors, whose own hashes name the tensor
        uint64_t expect_off = 0;
        for (const auto& part : m.at("parts")) {
            const std::string name = part.at("name");
            const uint64_t off = part.at("offset"), size = part.at("size");
            if (off != expect_off) bad("manifest: part " + name + " does not follow the previous part");
            if (off > payload.size() || size > payload.size() - off)
                bad("truncated: part " + name + " (" + std::to_string(size) + " bytes at payload offset " +
                    std::to_string(off) + ") extends past the end of the file");
            const auto bytes = payload.subspan(size_t(off), size_t(size));
            if (check_hashes && altered_part.empty() && hex_hash(bytes) != part.at("sha256").get<std::string>())
                altered_part = name;
            parts[name] = bytes;
            expect_off = off + size;
        }
        if (expect_off != payload.size())
            bad(std::to_string(payload.size() - expect_off) + " bytes after the last part");
        for (const char* need : {kPublicPart, kSecretPart})
            if (!parts.count(need)) bad(std::string("manifest lists no part '") + need + "' (missing part)");

        // secret tensors: every table entry must be in the manifest, inside the secret part, with its hash
        const auto secret_part = parts[kSecretPart];
        std::map<std::string, const json*> by_name;
        for (const auto& t : m.at("tensors")) by_name[t.at("name").get<std::string>()] = &t;
        for (const pkg::SecretEntry& e : table.secrets) {
            SecretTensor st;
            st.name = pkg::secret_tensor_name(e.kind, e.layer, e.proj);
            st.entry = e;
            const auto it = by_name.find(st.name);
            if (st.name.empty() || it == by_name.end() || !it->second->at("secret").get<bool>())
                bad("secret tensor " + (st.name.empty() ? std::string("?") : st.name) +
                    " of the secret table is missing from the manifest");
            const json& t = *it->second;
            const uint64_t off = t.at("offset"), size = t.at("size");
            const uint64_t want = e.elements * 4 + uint64_t(e.n_chunks) * pkg::kTagBytes;
            if (size != want || off > secret_part.size() || size > secret_part.size() - off)
                bad("secret tensor " + st.name + ": its ciphertext (" + std::to_string(size) +
                    " bytes) does not fit the secret part (missing or truncated)");
            const auto ct = secret_part.subspan(size_t(off), size_t(size));
            if (check_hashes && hex_hash(ct) != t.at("sha256").get<std::string>())
                fail(Status::integrity, path + ": secret tensor " + st.name +
                                            ": its ciphertext does not match its sha256 in the manifest (altered)");
            size_t at = 0;
            for (uint32_t ch = 0; ch < e.n_chunks; ++ch) {
                const uint64_t n = std::min(e.chunk_elements, e.elements - uint64_t(ch) * e.chunk_elements);
                st.chunks.push_back(ct.subspan(at, size_t(n) * 4 + pkg::kTagBytes));
                at += size_t(n) * 4 + pkg::kTagBytes;
            }
            p->secrets_.push_back(std::move(st));
        }
        if (!altered_part.empty())
            fail(Status::integrity, path + ": part " + altered_part + " does not match its sha256 in the manifest (altered)");

        // the public model: the public GGUF read in place, zeros (never stored) for the secret base tensors
        const auto pub = parts[kPublicPart];
        const std::shared_ptr<const std::vector<uint8_t>> keep = p->bytes_;
        const auto r = std::shared_ptr<const gguf::Reader>(
            new gguf::Reader(gguf::Reader::from_memory(pub.data(), pub.size(), path + " (" + kPublicPart + ")")),
            [keep](const gguf::Reader* x) { delete x; });
        GgufSource::Absent placeholders;
        for (const auto& t : m.at("tensors")) {
            const bool is_secret = t.at("secret");
            const std::string name = t.at("name");
            const bool is_lora = name.size() > 7 && (name.ends_with(".lora_a") || name.ends_with(".lora_b"));
            if (!is_secret) {
                if (!r->find_tensor(name)) bad("public tensor " + name + " is missing from " + kPublicPart);
                continue;
            }
            if (is_lora) continue;
            const std::vector<uint64_t> ne = t.at("ne");
            uint64_t n = 1;
            for (uint64_t x : ne) n *= x;
            if (ne.empty() || n == 0 || n > (uint64_t(1) << 34)) bad("secret tensor " + name + ": bad shape");
            placeholders[name] = ne;
            p->secret_names_.push_back(name);
        }
        auto source = std::make_shared<const GgufSource>(r, std::move(placeholders));
        p->model_.weights.cfg = source->config();
        p->model_.vocab = load_gguf_vocab(*r);
        p->model_.source = std::move(source);
        p->model_.lazy = true;
        p->model_.format = ModelFileFormat::gguf;
        p->model_.path = path;
        p->model_.vocab_path = path;
        if (m.at("secret") == "all") p->secret_names_ = {"*"};
        // every table entry for a base tensor must be one the model has
        for (const auto& st : p->secrets_)
            if (st.entry.kind != uint32_t(TensorKind::lora_a) && st.entry.kind != uint32_t(TensorKind::lora_b) &&
                !std::count(p->secret_names_.begin(), p->secret_names_.end(), st.name) && p->secret_names_ != std::vector<std::string>{"*"})
                bad("secret tensor " + st.name + " is in the secret table but not marked secret in the manifest");
    } catch (const json::exception& e) {
        bad(std::string("manifest: missing or malformed field (") + e.what() + ")");
    }
    return p;
}

std::string describe_package(const std::string& path) {
    const auto p = Package::open(path);
    const json m = json::parse(p->manifest_json());
    std::ostringstream o;
    o << "package: " << path << "\n";
    o << "format: secureinfer-package version " << m.at("version") << "\n";
    o << "model id: " << m.at("model_id").get<std::string>() << "\n";
    const uint32_t rel = p->release();
    o << "release: top-" << (rel & pkg::kReleaseLogprobsMask) << " log-probabilities per token, "
      << ((rel & pkg::kReleaseNll) ? "log-likelihood evaluation allowed" : "no log-likelihood evaluation") << "\n";
    const pkg::SamplingPolicy& sp = p->sampling();
    o << "sampling: temperature <= " << sp.max_temperature << ", top-k "
      << (sp.min_top_k > 0 ? "off or >= " + std::to_string(sp.min_top_k) : std::string("any")) << ", top-p >= "
      << sp.min_top_p << ", log-probability noise >= " << sp.min_logprob_noise
      << " (enforced in the enclave; draws use the enclave's own randomness)\n";
    o << "name: " << m.at("name").get<std::string>() << "\n";
    const auto& c = m.at("config");
    o << "config: dim " << c.at("dim") << ", hidden " << c.at("hidden_dim") << ", layers " << c.at("n_layers")
      << ", heads " << c.at("n_heads") << ", kv heads " << c.at("n_kv_heads") << ", vocab " << c.at("vocab_size")
      << ", context " << c.at("seq_len") << (c.at("tied_classifier").get<bool>() ? ", tied classifier" : "") << "\n";
    if (c.at("rope_freq_factors").get<uint64_t>() > 0)
        o << "rope frequency factors: " << c.at("rope_freq_factors") << " (sha256 "
          << c.at("rope_freq_factors_sha256").get<std::string>() << ")\n";
    o << "secret: " << m.at("secret").get<std::string>() << "\n";
    for (const auto& a : m.at("adapters"))
        o << "adapter: " << a.at("file").get<std::string>() << " (" << a.at("tensors") << " tensors, alpha "
          << a.at("alpha") << ")\n";
    for (const auto& part : m.at("parts"))
        o << "part: " << part.at("name").get<std::string>() << " " << part.at("size") << " bytes sha256 "
          << part.at("sha256").get<std::string>() << "\n";
    size_t n_pub = 0, n_sec = 0;
    for (const auto& t : m.at("tensors")) (t.at("secret").get<bool>() ? n_sec : n_pub)++;
    o << "tensors: " << n_pub << " public, " << n_sec << " secret (AES-256-GCM)\n";
    for (const auto& t : m.at("tensors")) {
        o << "  " << (t.at("secret").get<bool>() ? "secret " : "public ") << t.at("name").get<std::string>() << " "
          << t.at("ne").dump();
        if (t.at("secret").get<bool>())
            o << " " << t.at("chunks") << " chunk(s), " << t.at("size") << " bytes, sha256 "
              << t.at("sha256").get<std::string>().substr(0, 16) << "...";
        o << "\n";
    }
    o << "bound: the model configuration and " << p->bound_public_tensors()
      << " public tensor uploads (SHA-256 each, under the manifest's MAC; the enclave refuses any other)\n";
    o << "manifest authenticity: not checked here (HMAC under a key derived from the model key; the enclave checks "
         "it after key release)\n";
    return o.str();
}

}  // namespace si
