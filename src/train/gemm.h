// The one matrix product of the trainer, in "broadcast" form: C[n][m] (+)= sum_k A[n][k] * B[k][m], all row-major.
// Vectorised along m (the output row), so short inner dimensions (LoRA rank 8, head width 8) waste nothing on
// horizontal sums. Every element of C is summed in ascending k (starting from C's old value when accumulating) by
// exactly one work item, so the result does not depend on the thread count.
#pragma once
#include <cstdint>
#include <vector>

#include "common/threadpool.h"

namespace si::train {

template <class T>
void gemm(ThreadPool& pool, const T* A, int64_t n, int64_t k, const T* B, int64_t m, T* C, bool accumulate);

// dst[c][r] = src[r][c] for a [rows][cols] source.
template <class T>
void transpose(const T* src, int64_t rows, int64_t cols, std::vector<T>& dst);

}  // namespace si::train
