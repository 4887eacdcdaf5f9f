// What the accelerator backends share: the weights a backend holds by handle. The table issues handles and, before
// a backend touches any memory, checks that a handle names one of its weights with the shape the handle states, that
// the backend supports the op on that weight type, and that the product's activations are sane.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "backends/accelerator.h"
#include "common/error.h"

namespace si {

// One line of a backend's table of the ops it accepts, by weight type.
struct SupportedOp {
    AccelOp op;
    DType weight;
};

template <size_t N>
constexpr bool table_supports(const SupportedOp (&table)[N], AccelOp op, DType weight) {
    for (const SupportedOp& s : table)
        if (s.op == op && s.weight == weight) return true;
    return false;
}

// W: a backend's weight, with members `DType type` and `int64_t N, K`.
template <class W>
class WeightTable {
public:
    // backend: the name in error messages; max_dim: the largest N, K and T * max(N, K + k_slack) it accepts.
    WeightTable(const char* backend, int64_t max_dim, int64_t k_slack = 0)
        : backend_(backend), max_dim_(max_dim), k_slack_(k_slack) {}

    void check_shape(const void* weights, int64_t N, int64_t K) const {
        if (!weights || N < 1 || K < 1 || N > max_dim_ || K > max_dim_ || N > (int64_t(1) << 40) / K)
            fail(Status::invalid_argument,
                 backend_ + " backend: bad weight shape " + std::to_string(N) + "x" + std::to_string(K));
    }

    WeightHandle add(std::unique_ptr<W> w) {
        const WeightHandle h{++next_id_, w->type, w->N, w->K};
        weights_.emplace(h.id, std::move(w));
        return h;
    }

    void release(WeightHandle& h) {
        if (h.id != 0) weights_.erase(h.id);
        h = WeightHandle{};
    }

    // Frees every weight (a device backend does so before it tears down its device context).
    void clear() { weights_.clear(); }

    const W& lookup(const Accelerator& backend, const WeightHandle& h, AccelOp op, int64_t T, const void* X,
                    const void* Y) const {
        const auto it = weights_.find(h.id);
        if (it == weights_.end()) fail(Status::invalid_argument, backend_ + " backend: unknown weight handle");
        const W& w = *it->second;
        if (h.type != w.type || h.rows != w.N || h.cols != w.K)
            fail(Status::invalid_argument, backend_ + " backend: weight handle does not match its weight");
        if (!backend.supports(op, w.type))
            fail(Status::unsupported, backend_ + " backend: " + op_name(op) + " on " + dtype_name(w.type) + " weights");
        if (T < 0 || (T > 0 && (!X || !Y)) || T > max_dim_ / std::max(w.N, w.K + k_slack_))
            fail(Status::invalid_argument, backend_ + " backend: " + op_name(op) + ": bad activations");
        return w;
    }

private:
    std::string backend_;
    int64_t max_dim_, k_slack_;
    uint64_t next_id_ = 0;
    std::unordered_map<uint64_t, std::unique_ptr<W>> weights_;
};

}  // namespace si
