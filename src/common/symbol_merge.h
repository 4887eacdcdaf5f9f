// The pair-merge loop shared by the SentencePiece (score) and byte-level BPE (rank) tokenizers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace si::symbol_merge {

// One run of bytes of the text being merged; the live symbols form a doubly linked chain.
struct Symbol {
    int32_t prev, next;  // neighbours in the chain of live symbols, -1 at the ends
    uint32_t off, n;     // bytes of the run; n == 0 once merged into its left neighbour
};

// A queued candidate: the merge of two neighbours. `size` is both symbols' n when queued, so a mismatch later means
// one of them has changed since and the entry is stale.
template <class Priority>
struct Pair {
    Priority priority;
    int32_t left, right;
    uint32_t size;
};

// Merges neighbours until no queued pair is left, best pair first. `lookup(left, right, priority)` returns false when
// the two symbols cannot merge, else sets the pair's priority; `worse(a, b)` is the heap order (true when a merges
// after b). Both tokenizers break ties to the leftmost pair in `worse`, as llama.cpp does.
template <class Priority, class Lookup, class Worse>
void merge_pairs(std::vector<Symbol>& sym, std::vector<Pair<Priority>>& heap, Lookup lookup, Worse worse) {
    heap.clear();
    const auto try_add = [&](int32_t left, int32_t right) {
        if (left < 0 || right < 0) return;
        Priority priority;
        if (!lookup(sym[size_t(left)], sym[size_t(right)], priority)) return;
        heap.push_back(Pair<Priority>{priority, left, right, sym[size_t(left)].n + sym[size_t(right)].n});
        std::push_heap(heap.begin(), heap.end(), worse);
    };
    for (int32_t i = 1; i < int32_t(sym.size()); ++i) try_add(i - 1, i);

    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), worse);
        const Pair<Priority> p = heap.back();
        heap.pop_back();
        Symbol& l = sym[size_t(p.left)];
        Symbol& r = sym[size_t(p.right)];
        if (l.n == 0 || r.n == 0 || l.n + r.n != p.size) continue;  // stale: a neighbour merged since
        l.n += r.n;
        r.n = 0;
        l.next = r.next;
        if (r.next >= 0) sym[size_t(r.next)].prev = p.left;
        try_add(l.prev, p.left);
        try_add(p.left, l.next);
    }
}

}  // namespace si::symbol_merge
