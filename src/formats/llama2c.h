// llama2.c legacy (version 0) checkpoints: a 7 x int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size, seq_len; a negative vocab_size means a separate classifier follows), then fp32 tensors in a fixed
// order. RoPE tables stored in the file are skipped (they are recomputed).
#pragma once
#include <string>

#include "common/model.h"

namespace si {

// Throws si::Error naming the path: io when unreadable, format when the header is absurd or the size does not match.
ModelWeights load_llama2c(const std::string& path);
// True when the file does not start with the GGUF magic (the loader decides by content, not by extension).
bool looks_like_gguf(const std::string& path);

}  // namespace si
