// Crossings of the trusted core's boundary (DESIGN.md sections 4 and 5): masking a stage's input with fresh
// one-time pads, unblinding and checking (Freivalds) the accelerator's products, and precomputed unblinding
// factors, kept inside or sealed to the host.
#include "enclave/core_state.h"

#include <atomic>
#include <cstring>

namespace si {

using core::bad;
using core::wipe;
using core::kSealIvBytes;
using core::kSealKeyBytes;
using core::kSealTagBytes;
using core::kMaxPrecomputeCount;
using core::kMaxKeptFactorBytes;

namespace {

// Associated data of one sealed unit: binds it to its crossing slot, mask range and place in its batch.
std::vector<uint8_t> seal_aad(int layer, Stage st, uint64_t offset, uint32_t count, uint64_t seq, uint32_t idx,
                              int64_t K) {
    std::vector<uint8_t> a;
    auto put = [&](uint64_t v, int bytes) {
        for (int i = 0; i < bytes; ++i) a.push_back(uint8_t(v >> (8 * i)));
    };
    put(0x5349554eu, 4);  // "NUIS": domain separation
    put(uint32_t(layer), 4);
    put(uint8_t(st), 1);
    put(offset, 8);
    put(count, 4);
    put(seq, 8);
    put(idx, 4);
    put(uint64_t(K), 8);
    return a;
}

// The GCM nonce of a unit: (seq, idx) never repeats under one key, as seq only grows.
void seal_iv(uint64_t seq, uint32_t idx, uint8_t (&iv)[kSealIvBytes]) {
    for (int i = 0; i < 8; ++i) iv[i] = uint8_t(seq >> (8 * i));
    for (int i = 0; i < 4; ++i) iv[8 + i] = uint8_t(idx >> (8 * i));
}

// The sealed factors use the packages' AES-256-GCM (same IV and tag sizes): ciphertext | tag.
static_assert(kSealIvBytes == pkg::kIvBytes && kSealTagBytes == pkg::kTagBytes);

}  // namespace

// Erases the pending crossing's kept units (total words over its T rows) from the store: each is used once.
void TrustedCore::Impl::erase_kept_units(uint64_t total) {
    const size_t words = pending.T > 0 ? size_t(total) / size_t(pending.T) : 0;
    for (core::PreRow& row : pending.rows) {
        if (row.kept_wr) OPENSSL_cleanse(row.kept_wr, words * 4);
        row.kept_wr = nullptr;
    }
    kept_last.clear();  // freed, so zeroed
}

// Masks the quantised input xq [T][K] of a crossing and sends it out for the offloaded projections.
std::vector<uint8_t> TrustedCore::Impl::send_offload(int l, Stage st, std::vector<Proj> off, int T, int64_t K, bool classifier) {
    // One fresh pad per element of this crossing: x' = x + r (mod 2^32) is uniform, independent of x.
    const size_t n = size_t(T * K);
    r.resize(n);
    pending = Pending{};
    pending.active = true;
    pending.layer = l;
    pending.stage = st;
    pending.crossing = ++crossings;
    pending.projs = off;
    pending.T = T;
    pending.K = K;
    pending.classifier = classifier;
    PreSlot& ps = pre[size_t(l) * kStages + size_t(st)];
    uint64_t avail = 0, rows = 0;
    for (const PreBatch& b : ps.batches) avail += b.count;
    avail -= ps.next;
    for (Proj p : off) rows += uint64_t(proj(l, p).rows);
    // Every row of the crossing (a decode token of a slot, or a prompt position) takes the next precomputed unit,
    // when there is one for each and their sealed units would fit one message with the products.
    const bool fits = T == 1 || uint64_t(T) * (8 * rows + core::kSealTagBytes) + (64u << 10) <= SI_ENCLAVE_MAX_MESSAGE;
    if (avail >= uint64_t(T) && fits) {
        pending.pre = true;
        pending.rows.resize(size_t(T));
        for (int t = 0; t < T; ++t) {
            // Offline mode: the next reserved position of the pending batch, used exactly once.
            PreBatch& b = ps.batches.front();
            core::PreRow& row = pending.rows[size_t(t)];
            row.seq = b.seq;
            row.idx = ps.next;
            row.count = b.count;
            row.offset = b.offset + uint64_t(ps.next) * uint64_t(K);
            if (!b.kept.empty())
                row.kept_wr = b.kept.data() + size_t(ps.next) * (b.kept.size() / b.count);  // read in place, erased
            else
                ++pending.sealed_rows;
            masks->fill_at(row.offset, r.data() + size_t(t) * size_t(K), size_t(K));
            if (++ps.next == b.count) {
                kept_bytes -= 4 * b.kept.size();
                kept_last.push_back(std::move(b.kept));  // the pending crossing reads its last units
                ps.batches.pop_front();
                ps.next = 0;
            }
        }
        pending.unit_open = pending.sealed_rows == 0;
    } else {
        masks->fill(r.data(), n);
    }
    Encoder e(MsgType::offload);
    e.scalar<int32_t>(Tag::layer, l);
    e.scalar<uint8_t>(Tag::stage, uint8_t(st));
    e.scalar<uint64_t>(Tag::crossing, pending.crossing);
    std::vector<uint8_t> pl;
    for (Proj p : off) pl.push_back(uint8_t(p));
    e.add(Tag::projs, pl);
    e.scalar<int32_t>(Tag::count_t, T);
    e.scalar<int32_t>(Tag::count_k, int32_t(K));
    if (pending.pre) {
        std::vector<uint64_t> seqs_of(static_cast<size_t>(T));
        std::vector<uint32_t> idx(static_cast<size_t>(T));
        std::vector<uint8_t> keep(static_cast<size_t>(T));
        for (int t = 0; t < T; ++t) {
            seqs_of[size_t(t)] = pending.rows[size_t(t)].seq;
            idx[size_t(t)] = pending.rows[size_t(t)].idx;
            keep[size_t(t)] = pending.rows[size_t(t)].kept_wr ? 1 : 0;
        }
        e.add(Tag::batch, seqs_of);
        e.add(Tag::batch_index, idx);
        if (pending.sealed_rows < uint32_t(T)) e.add(Tag::keep, keep);  // the host holds nothing for these rows
    }
    auto* dst = e.reserve(Tag::activations, WireType::u32, n);
    for (size_t i = 0; i < n; ++i) {
        const uint32_t v = uint32_t(xq[i]) + r[i];
        std::memcpy(dst + 4 * i, &v, 4);
    }
    flops += n;
    e.scalar<uint64_t>(Tag::flops, take_flops());
    return e.finish();
}

// Checks that a message (products or unit) answers the pending crossing; returns its product count.
uint64_t TrustedCore::Impl::check_answers_pending(const Message& m, const char* what) {
    if (!pending.active) bad(std::string(what) + ": no crossing is pending");
    const int32_t layer = m.scalar<int32_t>(Tag::layer);
    const uint8_t stage = m.scalar<uint8_t>(Tag::stage);
    const uint64_t crossing = m.scalar<uint64_t>(Tag::crossing);
    if (layer != pending.layer || stage != uint8_t(pending.stage) || crossing != pending.crossing)
        bad(std::string(what) + ": they answer crossing " + std::to_string(crossing) + " (layer " +
            std::to_string(layer) + ", stage " + std::to_string(stage) + "), but crossing " +
            std::to_string(pending.crossing) + " (layer " + std::to_string(pending.layer) + ", stage " +
            stage_name(pending.stage) + ") is pending");
    uint64_t total = 0;
    for (Proj p : pending.projs) total += uint64_t(pending.T) * uint64_t(proj(pending.layer, p).rows);
    return total;
}

// The pending crossing's sealed unit ahead of its products: opened now, while the accelerator computes.
std::vector<uint8_t> TrustedCore::Impl::unit(const Message& m) {
    const uint64_t total = check_answers_pending(m, "unit");
    if (!pending.pre) bad("unit: sealed unblinding factors for a crossing that uses none");
    if (pending.sealed_rows == 0)
        bad("unit: the crossing's factors are kept inside the core; no sealed unit belongs to it");
    if (pending.unit_open) bad("unit: the crossing's sealed unit was already sent");
    open_unit(m, total);
    pending.unit_open = true;
    return ok();
}

std::vector<uint8_t> TrustedCore::Impl::products(const Message& m) {
    const uint64_t total = check_answers_pending(m, "products");
    const int T = pending.T;
    const wire::Field& f = m.field(Tag::products, WireType::u32, int64_t(total));
    const uint8_t* src = f.data;
    if (pending.pre && !pending.unit_open) {
        open_unit(m, total);
    } else if (m.has(Tag::sealed)) {
        bad(!pending.pre                ? "products: sealed unblinding factors for a crossing that uses none"
            : pending.sealed_rows == 0 ? "products: the crossing's factors are kept inside the core; no sealed unit "
                                         "belongs to it"
                                       : "products: the crossing's sealed unit was already sent");
    }
    // each row's unit: kept inside, or opened from the sealed units of this crossing (in row order)
    const size_t unit_words = size_t(total) / size_t(T);
    std::vector<const uint32_t*> row_src;
    if (pending.pre) {
        size_t j = 0;
        for (const core::PreRow& row : pending.rows)
            row_src.push_back(row.kept_wr ? row.kept_wr
                                          : reinterpret_cast<const uint32_t*>(pre_plain.data()) + unit_words * j++);
    }
    size_t pre_at = 0;
    for (Proj p : pending.projs) {
        ProjState& s = proj(pending.layer, p);
        const size_t n = size_t(T * s.rows);
        wr.resize(n);
        if (pending.pre) {
            // W r offline: row t's part of its own unit.
            for (int t = 0; t < T; ++t)
                std::memcpy(wr.data() + size_t(t) * size_t(s.rows), row_src[size_t(t)] + pre_at, 4 * size_t(s.rows));
            pre_at += size_t(s.rows);
        } else {
            // W r online: the same exact mod-2^32 product the accelerator computes on x'.
            gemm_masked(loop_pool(T), s.packed, r.data(), T, wr.data());
            flops += 2 * uint64_t(T) * uint64_t(s.rows * s.cols);
        }
        acc.resize(n);
        for (size_t i = 0; i < n; ++i) {
            uint32_t y;
            std::memcpy(&y, src + 4 * i, 4);
            acc[i] = int32_t(y - wr[i]);
        }
        src += 4 * n;
        flops += 2 * uint64_t(T) * uint64_t(s.rows + s.cols);
        if (!s.key->check_batch(acc.data(), xq.data(), T)) {
            const std::string msg = "integrity check failed: the accelerator's product for " +
                                    (pending.classifier ? std::string("the classifier")
                                                        : proj_tensor_name(pending.layer, p)) +
                                    " (crossing " +
                                    std::to_string(pending.crossing) + ") is wrong; the session is stopped";
            fail(Status::integrity, msg);
        }
        dequantize_product(acc.data(), T, s.rows, s.scale.data(), xs.data(),
                           pending.classifier ? logits.data() : fw->proj_output(p));
    }
    const bool classifier = pending.classifier;
    erase_kept_units(total);
    pending = Pending{};
    wipe(r);
    wipe(wr);
    wipe(pre_plain);
    if (classifier) return finish_pass();
    fw->finish_stage();
    return run();
}

// Authenticates and decrypts the sealed units the pending crossing needs (one per row not kept inside, in row
// order) into pre_plain. Anything but exactly those units (missing, replayed, reordered, altered, another slot's or
// another core's) is an integrity failure.
void TrustedCore::Impl::open_unit(const Message& m, uint64_t words) {
    const size_t unit = size_t(words) / size_t(pending.T) * 4;
    auto where = [&](const core::PreRow* row) {
        std::string w = "sealed unblinding factors for crossing " + std::to_string(pending.crossing) + " (layer " +
                        std::to_string(pending.layer) + ", stage " + stage_name(pending.stage);
        if (row) w += ", batch " + std::to_string(row->seq) + ", position " + std::to_string(row->idx);
        return w + ")";
    };
    const core::PreRow* first = nullptr;
    for (const core::PreRow& row : pending.rows)
        if (!row.kept_wr) {
            first = &row;
            break;
        }
    if (!m.has(Tag::sealed)) fail(Status::integrity, where(first) + " are missing; the session is stopped");
    const wire::Field& sf = m.field(Tag::sealed, WireType::u8);
    if (size_t(sf.count) != size_t(pending.sealed_rows) * (unit + kSealTagBytes))
        fail(Status::integrity, where(first) + " have the wrong size; the session is stopped");
    pre_plain.resize(size_t(pending.sealed_rows) * unit);
    size_t j = 0;
    for (const core::PreRow& row : pending.rows) {
        if (row.kept_wr) continue;
        uint8_t iv[kSealIvBytes];
        seal_iv(row.seq, row.idx, iv);
        const auto aad = seal_aad(pending.layer, pending.stage, row.offset, row.count, row.seq, row.idx, pending.K);
        if (!unit_opener.open(seal_key.data(), iv, aad, sf.data + j * (unit + kSealTagBytes), unit,
                              pre_plain.data() + j * unit))
            fail(Status::integrity,
                 where(&row) + " failed authentication (replayed, altered or foreign); the session is stopped");
        ++j;
    }
    flops += pre_plain.size();  // nominal: decryption
}

// Precomputes the unblinding factors of the next `count` single-token crossings of (layer, stage): reserves
// their pads, computes W R for the whole batch with one matrix-matrix product per projection, and returns
// them sealed, one unit per crossing.
std::vector<uint8_t> TrustedCore::Impl::precompute(const Message& m) {
    if (phase != Phase::ready) bad("precompute: the model is not loaded (finalize first)");
    if (pending.active || fw->in_pass()) bad("precompute: a forward pass is in progress");
    const int32_t l = m.scalar<int32_t>(Tag::layer);
    const uint8_t st_raw = m.scalar<uint8_t>(Tag::stage);
    const int32_t count = m.scalar<int32_t>(Tag::count_t);
    const uint8_t keep = m.has(Tag::keep) ? m.scalar<uint8_t>(Tag::keep) : 0;
    if (keep > 1) bad("precompute: keep must be 0 or 1");
    if (l < 0 || l > cfg.n_layers) bad("precompute: layer " + std::to_string(l) + " out of range");
    if (st_raw >= kStages || (l == cfg.n_layers && st_raw != uint8_t(Stage::qkv)))
        bad("precompute: stage " + std::to_string(st_raw) + " out of range");
    if (count < 1 || uint32_t(count) > kMaxPrecomputeCount)
        bad("precompute: count " + std::to_string(count) + " out of range [1, " + std::to_string(kMaxPrecomputeCount) + "]");
    const Stage st = Stage(st_raw);
    std::vector<Proj> off;
    uint64_t rows = 0;
    int64_t K = 0;
    const std::span<const Proj> sp = l == cfg.n_layers ? std::span<const Proj>(&kClassifierSlot, 1) : stage_projs(st);
    for (Proj p : sp)
        if (proj(l, p).offload) {
            off.push_back(p);
            rows += uint64_t(proj(l, p).rows);
            K = proj(l, p).cols;
        }
    if (off.empty()) bad("precompute: layer " + std::to_string(l) + " stage " + stage_name(st) + " offloads nothing");
    const uint64_t unit = rows * 4, sealed_bytes = uint64_t(count) * (unit + kSealTagBytes);
    if (keep) {
        if (kept_bytes + uint64_t(count) * unit > kMaxKeptFactorBytes)
            fail(Status::out_of_memory, "precompute: keeping " + std::to_string((uint64_t(count) * unit) >> 10) +
                                            " KiB more unblinding factors would exceed the core's " +
                                            std::to_string(kMaxKeptFactorBytes >> 20) + " MiB for them (" +
                                            std::to_string(kept_bytes >> 10) + " KiB kept); seal them instead");
    } else if (sealed_bytes + (64u << 10) > SI_ENCLAVE_MAX_MESSAGE) {
        bad("precompute: the batch would not fit one message");
    }

    const MaskRange range = masks->reserve(uint64_t(count) * uint64_t(K));
    pre_r.resize(size_t(count) * size_t(K));
    masks->fill_at(range.offset, pre_r.data(), pre_r.size());
    pre_wr.resize(size_t(count) * size_t(rows));
    size_t at = 0;
    for (Proj p : off) {
        ProjState& s = proj(l, p);
        gemm_masked(pool.get(), s.packed, pre_r.data(), count, pre_wr.data() + at);
        at += size_t(count) * size_t(s.rows);
        flops += 2 * uint64_t(count) * uint64_t(s.rows * s.cols);
    }
    wipe(pre_r);
    const uint64_t seq = ++batch_seq;
    Encoder e(MsgType::sealed);
    e.scalar<int32_t>(Tag::layer, l);
    e.scalar<uint8_t>(Tag::stage, st_raw);
    e.scalar<uint64_t>(Tag::batch, seq);
    e.scalar<uint64_t>(Tag::offset, range.offset);
    e.scalar<int32_t>(Tag::count_t, count);
    e.scalar<int32_t>(Tag::count_k, int32_t(K));
    if (keep) {
        // Kept inside: unit after unit, as the crossings will take them.
        PreBatch b{seq, range.offset, uint32_t(count), SecretVector<uint32_t>(size_t(count) * size_t(rows))};
        size_t o = 0, base = 0;
        for (Proj p : off) {
            const size_t pr = size_t(proj(l, p).rows);
            for (int32_t t = 0; t < count; ++t)
                std::memcpy(b.kept.data() + size_t(t) * size_t(rows) + o, pre_wr.data() + base + size_t(t) * pr,
                            4 * pr);
            o += pr;
            base += size_t(count) * pr;
        }
        wipe(pre_wr);
        kept_bytes += 4 * b.kept.size();
        pre[size_t(l) * kStages + size_t(st)].batches.push_back(std::move(b));
        e.scalar<uint8_t>(Tag::keep, 1);
        e.scalar<uint64_t>(Tag::flops, take_flops());
        return e.finish();
    }
    uint8_t* dst = e.reserve(Tag::sealed, WireType::u8, size_t(sealed_bytes));
    // Units are sealed independently (own IV and AAD), so they are sealed in parallel, in a few contiguous parts
    // with one cipher context each; a failure inside a loop is reported after it, on this thread.
    std::atomic<bool> seal_failed{false};
    const int64_t parts = std::min<int64_t>(count, 64);
    auto seal_parts = [&](int64_t part_begin, int64_t part_end) {
        try {
            pkg::GcmSealer sealer;
            SecretVector<uint8_t> plain(static_cast<size_t>(unit), 0);
            for (int64_t t = part_begin * count / parts; t < part_end * count / parts; ++t) {
                // unit t: W_p r_t for every projection p of the stage, in order
                size_t o = 0, base = 0;
                for (Proj p : off) {
                    const size_t pr = size_t(proj(l, p).rows);
                    std::memcpy(plain.data() + o, pre_wr.data() + base + size_t(t) * pr, 4 * pr);
                    o += 4 * pr;
                    base += size_t(count) * pr;
                }
                uint8_t iv[kSealIvBytes];
                seal_iv(seq, uint32_t(t), iv);
                sealer.seal(seal_key.data(), iv,
                            seal_aad(l, st, range.offset + uint64_t(t) * uint64_t(K), uint32_t(count), seq, uint32_t(t), K),
                            plain.data(), size_t(unit), dst + size_t(t) * (unit + kSealTagBytes));
            }
            wipe(plain);
        } catch (...) {
            seal_failed = true;
        }
    };
    if (pool)
        pool->parallel_for(parts, 1, seal_parts);
    else
        seal_parts(0, parts);
    if (seal_failed) fail(Status::internal, "precompute: sealing the unblinding factors failed");
    flops += sealed_bytes;  // nominal: encryption
    wipe(pre_wr);
    pre[size_t(l) * kStages + size_t(st)].batches.push_back(PreBatch{seq, range.offset, uint32_t(count), {}});
    e.scalar<uint64_t>(Tag::flops, take_flops());
    return e.finish();
}

}  // namespace si
