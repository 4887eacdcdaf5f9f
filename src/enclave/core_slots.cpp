// Sequence slots of the trusted core: one copy of the weights, several sequences, each with its own KV cache
// (allocated in chunks as it grows), sampler and context. A step advances a set of slots together: their tokens
// (one decode token each, or a prompt chunk) are the rows of one pass, so every crossing carries one batched
// product over all of them, each row with its own fresh pads (or its own precomputed unit) and checked by
// Freivalds with the rest. Each row's arithmetic is that of its sequence alone, so the tokens do not depend on
// what else is in the batch.
#include "enclave/core_state.h"

#include <algorithm>
#include <cstring>

namespace si {

using core::bad;
using core::wipe;

// The slot a message names (Tag::slot; slot 0 when absent).
int TrustedCore::Impl::slot_of(const Message& m, const char* what) const {
    if (!m.has(Tag::slot)) return 0;
    const int32_t s = m.scalar<int32_t>(Tag::slot);
    if (s < 0 || size_t(s) >= seqs.size())
        bad(std::string(what) + ": slot " + std::to_string(s) + " out of range [0, " + std::to_string(seqs.size()) +
            ")");
    return s;
}

// Starts the pass described by `pass` over `tokens` (its segments' tokens, stacked): checks that the slots' caches
// may grow as far, chains each sequence's context hash (packages) and begins the staged forward.
void TrustedCore::Impl::begin_pass(std::span<const int32_t> tokens) {
    uint64_t kv_total = 0;
    for (const SeqSlot& q : seqs) kv_total += q.kv.bytes();
    std::vector<PassSegment> segs;
    for (PassSeg& g : pass) {
        SeqSlot& q = seqs[size_t(g.slot)];
        if (int64_t(q.kv.pos()) + g.n > n_ctx)
            bad("context overflow: slot " + std::to_string(g.slot) + " holds " + std::to_string(q.kv.pos()) +
                " tokens; " + std::to_string(g.n) + " more exceed the context of " + std::to_string(n_ctx));
        const uint64_t after = fw->kv_bytes(q.kv.pos() + g.n);
        if (after > q.kv.bytes()) kv_total += after - q.kv.bytes();
        segs.push_back(PassSegment{&q.kv, tokens.data() + g.row0, g.n});
        // A package's draws depend on the context after this pass, chained token by token (so that it does not
        // depend on how a prompt is batched); other runs draw from their seed alone and need no hash.
        g.context_hash = q.context_hash;
        if (package)
            for (int t = 0; t < g.n; ++t) {
                uint8_t b[pkg::kHashBytes + 4];
                std::memcpy(b, g.context_hash.data(), pkg::kHashBytes);
                std::memcpy(b + pkg::kHashBytes, &tokens[size_t(g.row0 + t)], 4);
                g.context_hash = pkg::sha256(b);
            }
    }
    if (kv_total > kv_limit)
        fail(Status::out_of_memory, "the sequence slots' KV caches would grow to " + std::to_string(kv_total >> 20) +
                                        " MiB, more than the " + std::to_string(kv_limit >> 20) +
                                        " MiB the trusted core has for them; reset or use fewer slots");
    fw->begin(segs);
}

std::vector<uint8_t> TrustedCore::Impl::step(const Message& m) {
    if (phase != Phase::ready) bad("step: the model is not loaded (finalize first)");
    if (pending.active || fw->in_pass()) bad("step: a forward pass is already in progress");
    const wire::Field& sf = m.field(Tag::slots, WireType::i32);
    if (sf.count < 1 || sf.count > seqs.size())
        bad("step: slot count " + std::to_string(sf.count) + " out of range [1, " + std::to_string(seqs.size()) + "]");
    const auto slots = m.array<int32_t>(Tag::slots);
    const auto counts = m.array<int32_t>(Tag::counts, sf.count);
    const auto sample = m.array<uint8_t>(Tag::sample, sf.count);
    const auto tokens = m.array<int32_t>(Tag::tokens);
    std::vector<uint8_t> seen(seqs.size(), 0);
    int64_t total = 0;
    pass.clear();
    bool any_sample = false;
    for (size_t i = 0; i < slots.size(); ++i) {
        const int32_t s = slots[i];
        if (s < 0 || size_t(s) >= seqs.size())
            bad("step: slot " + std::to_string(s) + " out of range [0, " + std::to_string(seqs.size()) + ")");
        if (seen[size_t(s)]++) bad("step: slot " + std::to_string(s) + " named twice");
        if (counts[i] < 1 || counts[i] > n_ctx)
            bad("step: token count " + std::to_string(counts[i]) + " of slot " + std::to_string(s) +
                " out of range [1, " + std::to_string(n_ctx) + "]");
        if (sample[i] > 1) bad("step: sample flags must be 0 or 1");
        pass.push_back(PassSeg{s, int(total), counts[i], sample[i] == 1, {}});
        total += counts[i];
        any_sample |= sample[i] == 1;
    }
    if (total != int64_t(tokens.size()))
        bad("step: " + std::to_string(tokens.size()) + " tokens for slot counts summing to " + std::to_string(total));
    if (total > n_ctx) bad("step: " + std::to_string(total) + " tokens exceed the pass limit of " + std::to_string(n_ctx));
    if (any_sample && package && logprobs_k > int(release_policy & pkg::kReleaseLogprobsMask))
        fail(Status::security, "the package's owner allows at most " +
                                   std::to_string(release_policy & pkg::kReleaseLogprobsMask) +
                                   " log-probabilities per token; " + std::to_string(logprobs_k) + " were asked");
    for (const PassSeg& g : pass)
        if (g.sample) check_sampling_policy(seqs[size_t(g.slot)].params, logprobs_k, logprob_noise);
    output = any_sample ? wire::OutputKind::sample : wire::OutputKind::none;
    targets.clear();
    stepping = true;
    try {
        begin_pass(tokens);
    } catch (...) {
        pass.clear();
        stepping = false;
        throw;
    }
    return run();
}

// The end of a step: each sampling slot's token from its own sampler (logits row i of the i-th sampling slot).
std::vector<uint8_t> TrustedCore::Impl::finish_step() {
    const int V = cfg.vocab_size;
    Encoder e(MsgType::result);
    std::vector<int32_t> slots, toks, pos;
    std::vector<int32_t> ids;
    std::vector<float> values;
    size_t row = 0;
    for (const PassSeg& g : pass) {
        SeqSlot& q = seqs[size_t(g.slot)];
        int32_t tok = -1;
        if (g.sample) {
            const float* lg = logits.data() + row * size_t(V);
            if (package) q.sampler->reseed(draw_seed(q.params, g.context_hash));
            tok = q.sampler->sample(lg, V);
            if (logprobs_k > 0) release_logprobs(lg, ids, values);
            ++row;
        }
        slots.push_back(g.slot);
        toks.push_back(tok);
    }
    fw->end_pass();
    for (const PassSeg& g : pass) {
        seqs[size_t(g.slot)].context_hash = g.context_hash;
        pos.push_back(seqs[size_t(g.slot)].kv.pos());
    }
    pass.clear();
    stepping = false;
    wipe(logits);
    wipe(xq);
    e.add(Tag::slots, slots);
    e.add(Tag::tokens, toks);
    e.add(Tag::counts, pos);
    if (logprobs_k > 0 && !ids.empty()) {
        e.add(Tag::logprob_ids, ids);
        e.add(Tag::logprob_values, values);
    }
    e.scalar<int32_t>(Tag::pos, seqs[0].kv.pos());
    e.scalar<uint64_t>(Tag::flops, take_flops());
    return e.finish();
}

// Forgets one slot's sequence: its KV cache (freed, so zeroed), its context and its sampler's state (recreated
// from its settings), so that the next request in the slot observes nothing of the previous one.
std::vector<uint8_t> TrustedCore::Impl::reset_slot(const Message& m) {
    if (phase != Phase::ready) bad("reset: the model is not loaded");
    const int s = slot_of(m, "reset");
    if (pending.active || fw->in_pass()) abandon();
    SeqSlot& q = seqs[size_t(s)];
    q.kv.clear();
    q.context_hash = pkg::Hash{};
    q.sampler = std::make_unique<Sampler>(q.params);
    Encoder e(MsgType::ok);
    e.scalar<int32_t>(Tag::pos, seqs[0].kv.pos());
    e.scalar<uint64_t>(Tag::flops, take_flops());
    return e.finish();
}

}  // namespace si
