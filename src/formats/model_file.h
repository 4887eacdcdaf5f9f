// Opens a model file of any supported format (decided by content: GGUF magic, else llama2.c) with its vocabulary.
#pragma once
#include <memory>
#include <string>

#include "common/model.h"
#include "common/tensor_source.h"
#include "common/vocab.h"

namespace si {

namespace gguf {
class Reader;
}

enum class ModelFileFormat { gguf, llama2c };

struct ModelFile {
    // The dense f32 weights; with LoadWeights::lazy only weights.cfg is set (the tensors are read from `source`).
    ModelWeights weights;
    // lazy: the tensors one at a time, over the memory-mapped GGUF (shareable between copies); dense: null.
    std::shared_ptr<const TensorSource> source;
    bool lazy = false;
    Vocab vocab;
    ModelFileFormat format = ModelFileFormat::gguf;
    std::string path, vocab_path;
    // GGUF files: the open (memory-mapped) file, for engines that read tensors in their stored format.
    std::shared_ptr<const gguf::Reader> gguf;
};

// dense: every tensor in f32 in ModelFile::weights. lazy (bounded memory): GGUF files keep only the mapping and the
// checked layout; tensors are dequantised when a consumer reads them from ModelFile::source (llama2.c checkpoints
// are loaded dense either way).
enum class LoadWeights { dense, lazy };

// The model's tensors: its lazy source, or a DenseSource borrowing m.weights (valid while m lives).
std::shared_ptr<const TensorSource> source_for(const ModelFile& m);

// tokenizer_path: a tokenizer.bin for llama2.c checkpoints ("" to look for tok<vocab>.bin / tokenizer.bin beside
// the model); for GGUF files a non-empty path replaces the embedded vocabulary. Throws si::Error naming the file;
// a vocabulary whose size differs from the model's is a format error naming both sizes.
ModelFile load_model_file(const std::string& path, const std::string& tokenizer_path = "",
                          LoadWeights load = LoadWeights::dense);

// Loads only a vocabulary: from a GGUF (model or vocab-only) or a tokenizer.bin (all entries in the file).
Vocab load_vocab_file(const std::string& path);

}  // namespace si
